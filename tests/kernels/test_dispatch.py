"""The dispatch: the torch reference on CPU by default, Triton when SUBLAYER_TRITON=1 (or on CUDA)."""

import importlib

import pytest
import torch

import kernels

# Imported by name: the package re-exports `swiglu` the function over `kernels.swiglu` the module.
rmsnorm, swiglu, rotary, attention_prefill, attention_decode = (
    importlib.import_module(f"kernels.{m}")
    for m in ("rmsnorm", "swiglu", "rotary", "attention_prefill", "attention_decode"))


def _calls():
    """(module, triton function name, call of the public entry point on small CPU tensors)."""
    x = torch.randn(2, 16)
    q4, kv4 = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 2, 8)
    cache = torch.zeros(1, 2, 6, 8)
    cos, sin = kernels.rope_tables(kernels.rope_inv_freq(8, 10000.0), 6)
    pos = torch.arange(3)[None]
    return [
        (rmsnorm, "add_rmsnorm_triton", lambda: kernels.add_rmsnorm(x, x, torch.ones(16), 1e-5)),
        (swiglu, "swiglu_triton", lambda: kernels.swiglu(x)),
        (rotary, "rotary_write_kv_triton",
         lambda: kernels.rotary_write_kv(q4, kv4, kv4, cos, sin, pos, cache, cache.clone(), 0)),
        (attention_prefill, "prefill_attention_triton",
         lambda: kernels.prefill_attention(q4, cache, cache, 0, torch.zeros(1, dtype=torch.long), 0.3)),
        (attention_decode, "decode_attention_triton",
         lambda: kernels.decode_attention(q4[:, 0], cache, cache, torch.zeros(1, dtype=torch.long),
                                          torch.full((1,), 3), 0.3)),
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU default")
@pytest.mark.parametrize("env", [None, "1"])
def test_dispatch_picks_reference_on_cpu_and_triton_on_request(monkeypatch, env):
    if env is None:
        monkeypatch.delenv("SUBLAYER_TRITON", raising=False)
    else:
        monkeypatch.setenv("SUBLAYER_TRITON", env)
    for module, name, call in _calls():
        called = []
        monkeypatch.setattr(module, name, lambda *a, **k: called.append(name))
        call()
        assert called == ([name] if env == "1" else []), name
