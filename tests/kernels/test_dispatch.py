"""The dispatch: CUDA tensors run Triton, CPU tensors the torch reference (Triton under the interpreter
when SUBLAYER_TRITON=1); every launch runs on its tensors' device."""

import contextlib

import pytest
import torch

import kernels
from kernels import activation, attention_decode, attention_prefill, dispatch, rmsnorm, rotary
from tests.kernels.kernel_testing import assert_close
from tests.kernels.launches import model_launches

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _calls(device):
    """(module, triton function name, call of the public entry point on small tensors on ``device``)."""
    x = torch.randn(2, 16, device=device)
    q4, kv4 = torch.randn(1, 3, 4, 8, device=device), torch.randn(1, 3, 2, 8, device=device)
    cache = torch.zeros(1, 2, 6, 8, device=device)
    cos, sin = kernels.rope_tables(kernels.rope_inv_freq(8, 10000.0), 6, device=device)
    pos = torch.arange(3, device=device)[None]
    zero = torch.zeros(1, dtype=torch.long, device=device)
    return [
        (rmsnorm, "add_rmsnorm_triton", lambda: kernels.add_rmsnorm(x, x, torch.ones(16, device=device), 1e-5)),
        (activation, "swiglu_triton", lambda: kernels.swiglu(x)),
        (rotary, "rotary_write_kv_triton",
         lambda: kernels.rotary_write_kv(q4, kv4, kv4, cos, sin, pos, cache, cache.clone(), 0)),
        (attention_prefill, "prefill_attention_triton",
         lambda: kernels.prefill_attention(q4, cache, cache, 0, zero, 0.3)),
        (attention_decode, "decode_attention_triton",
         lambda: kernels.decode_attention(q4[:, 0], cache, cache, zero, torch.full((1,), 3, device=device), 0.3)),
    ]


def _routes(monkeypatch, device):
    """For each op: whether its call reached the Triton launcher."""
    out = {}
    for module, name, call in _calls(device):
        called = []
        monkeypatch.setattr(module, name, lambda *a, **k: called.append(name))
        call()
        out[name] = called == [name]
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_tensors_run_triton_cpu_tensors_the_reference(monkeypatch, device):
    monkeypatch.delenv("SUBLAYER_TRITON", raising=False)
    routes = _routes(monkeypatch, device)
    assert all(routes.values()) if device == "cuda" else not any(routes.values()), routes


@pytest.mark.skipif(not dispatch.INTERPRETED, reason="Triton on CPU tensors needs the interpreter (no CUDA here)")
def test_sublayer_triton_runs_triton_on_cpu_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("SUBLAYER_TRITON", "1")
    assert all(_routes(monkeypatch, "cpu").values())


def test_sublayer_triton_without_the_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("SUBLAYER_TRITON", "1")
    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.swiglu(torch.randn(2, 8))


def test_on_device_makes_the_tensors_cuda_device_current():
    assert dispatch.on_device(torch.device("cuda:1")).idx == 1  # built without entering: no CUDA needed
    assert isinstance(dispatch.on_device(torch.device("cpu")), contextlib.nullcontext)


def test_every_launch_runs_in_its_tensors_device_context(monkeypatch):
    devices = []
    monkeypatch.setattr(dispatch, "on_device", lambda d: devices.append(d) or contextlib.nullcontext())
    launches = model_launches("stories260k", torch.float16)  # meta tensors: launches recorded, not run
    assert len(devices) == len(launches) > 0
    assert all(d.type == "meta" for d in devices)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_the_second_cuda_device_match_the_cpu_reference():
    torch.cuda.set_device(0)
    for _, _, call in _calls("cuda:1"):
        out = call()
        assert torch.cuda.current_device() == 0
        torch.cuda.synchronize(1)
        first = out[0] if isinstance(out, tuple) else out
        assert first.device == torch.device("cuda:1") and torch.isfinite(first).all()
    x = torch.randn(3, 64, device="cuda:1")
    assert_close(kernels.swiglu(x).cpu(), activation.swiglu_reference(x.cpu()), 1e-5)
