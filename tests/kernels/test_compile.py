"""Compile every kernel for sm_80 and sm_90 with exactly the launches the runtime makes for real
model shapes, and check that ptxas produced a cubin without register spills and that the shared
memory fits the card. Needs no GPU: the launchers run on meta tensors, their kernel launches are
recorded instead of run, and each recorded launch goes through the JIT's own argument
specialisation and then ``triton.compile`` for an explicit ``GPUTarget``.

The compiling happens in a subprocess without TRITON_INTERPRET: under the interpreter even
triton's own library functions (tl.sum, tl.max, ...) are interpreter objects that cannot compile.

The full sweep (4 models x 3 dtypes x 2 architectures) is marked slow (run it with -m slow);
the default run compiles a representative subset.
"""

import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

# Imported by name: the package re-exports `swiglu` the function over `kernels.swiglu` the module.
MODULES = [importlib.import_module(f"kernels.{m}")
           for m in ("rmsnorm", "swiglu", "rotary", "attention_prefill", "attention_decode")]
rmsnorm, swiglu, rotary, attention_prefill, attention_decode = MODULES
ROOT = Path(__file__).resolve().parents[2]

# Model shapes (from the checkpoints' config.json).
MODELS = {
    "llama2-7b": dict(hidden=4096, heads=32, kv_heads=32, head_dim=128, inter=11008, max_seq=4096),
    "llama3-8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336, max_seq=4096),
    "smollm2-135m": dict(hidden=576, heads=9, kv_heads=3, head_dim=64, inter=1536, max_seq=4096),
    "stories260k": dict(hidden=64, heads=8, kv_heads=4, head_dim=8, inter=172, max_seq=512),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Largest shared memory one block may use (bytes): A100 (sm_80) and H100 (sm_90).
MAX_SHARED = {80: 166912, 90: 232448}


@dataclass
class Launch:
    what: str
    kernel: object
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, what, sink):
        self.kernel, self.what, self.sink = kernel, what, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            flags = "".join(f" {k}={v}" for k, v in kwargs.items() if k.isupper() and isinstance(v, bool))
            self.sink.append(Launch(self.what + flags, self.kernel, args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(sink, what):
    saved = []
    for module in MODULES:
        for name, obj in list(vars(module).items()):
            if name.startswith("_") and name.endswith("_kernel"):
                saved.append((module, name, obj))
                setattr(module, name, _Recorder(obj, f"{what}/{name.strip('_')}", sink))
    try:
        yield
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


def model_launches(model: str, dtype: torch.dtype, batch=1, prompt=512) -> list[Launch]:
    """Every kernel launch of a prefill of `prompt` tokens, a short prefill (7 tokens: a smaller query
    tile) and one decode step, as the runtime's
    launchers make them (on meta tensors: no data, real shapes, strides and dtypes)."""
    m = MODELS[model]
    H, Hq, Hkv, D, I, S = m["hidden"], m["heads"], m["kv_heads"], m["head_dim"], m["inter"], m["max_seq"]
    meta = dict(device="meta", dtype=dtype)
    weight = torch.empty(H, **meta)
    cos = sin = torch.empty(S, D, device="meta", dtype=torch.float32)
    k_cache, v_cache = torch.empty(batch, Hkv, S, D, **meta), torch.empty(batch, Hkv, S, D, **meta)
    kv_start = torch.empty(batch, device="meta", dtype=torch.int64)
    kv_end = torch.empty(batch, device="meta", dtype=torch.int32)  # the engine's dtypes
    launches = []
    for phase, T in ((f"prefill{prompt}", prompt), ("prefill7", 7), ("decode", 1)):
        with _recording(launches, phase):
            x = torch.empty(batch, T, H, **meta)
            rmsnorm.add_rmsnorm_triton(None, x, weight, 1e-5)
            rmsnorm.add_rmsnorm_triton(x, x, weight, 1e-5)
            swiglu.swiglu_triton(torch.empty(batch, T, 2 * I, **meta))
            qkv = torch.empty(batch, T, Hq + 2 * Hkv, D, **meta)  # fused projection, split into views
            q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
            positions = torch.empty(batch, T, device="meta", dtype=torch.int64)
            q_rot = rotary.rotary_write_kv_triton(q, k, v, cos, sin, positions, k_cache, v_cache, 0)
            if phase != "decode":
                attention_prefill.prefill_attention_triton(q_rot, k_cache, v_cache, 0, kv_start, D ** -0.5)
            else:
                # A decode step captured in a CUDA graph passes the write index as a device tensor.
                start = torch.empty(1, device="meta", dtype=torch.int64)
                rotary.rotary_write_kv_triton(q, k, v, cos, sin, positions, k_cache, v_cache, start)
                attention_decode.decode_attention_triton(q_rot[:, 0], k_cache, v_cache, kv_start, kv_end,
                                                         D ** -0.5)
    return launches


def compile_launch(launch: Launch, arch: int):
    """Compile one recorded launch the way JITFunction.run would, for `arch`; returns
    (compiled kernel, ptxas log). Fresh cache dir so that ptxas really runs and prints its log."""
    fn = launch.kernel
    assert isinstance(fn, JITFunction), "compile in a process without TRITON_INTERPRET"
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    assert "enable_fp_fusion" in kwargs, "launchers must set the FP-fusion option explicitly"
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-compile-test-")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue()


PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")


def compile_model(model: str, dtype_name: str, arch: int) -> list[dict]:
    """Compile every distinct launch of `model`; one result per compiled kernel."""
    results, seen = [], set()
    for launch in model_launches(model, DTYPES[dtype_name]):
        t0 = time.perf_counter()
        compiled, log = compile_launch(launch, arch)
        key = (launch.what.split("/")[1], compiled.hash)  # same kernel, same binary
        if key in seen:  # the same specialisation launched twice (e.g. rmsnorm in both phases)
            continue
        seen.add(key)
        spills, regs = PTXAS_SPILLS.findall(log), PTXAS_REGS.findall(log)
        results.append({
            "what": launch.what, "cubin_bytes": len(compiled.asm.get("cubin", b"")),
            "regs": int(regs[-1]) if regs else None,
            "spill_stores": int(spills[-1][0]) if spills else None,
            "spill_loads": int(spills[-1][1]) if spills else None,
            "shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            "seconds": round(time.perf_counter() - t0, 2), "log": log,
        })
    return results


def check_model(model, dtype_name, arch, capsys):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, model, dtype_name, str(arch)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = []
    for r in results:
        rows.append(f"{model:13s} {dtype_name} sm_{arch} {r['what']:55s} regs {r['regs']} spill st/ld "
                    f"{r['spill_stores']}/{r['spill_loads']} smem {r['shared']} warps {r['num_warps']} "
                    f"{r['seconds']}s")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    kinds = {r["what"].split("/")[1].split()[0] for r in results}
    assert len(kinds) == 6, f"expected all 6 kernels to be launched, got {sorted(kinds)}"
    for r in results:
        assert r["cubin_bytes"] > 0, f"{r['what']}: no cubin"
        assert r["regs"] is not None and r["spill_stores"] is not None, f"{r['what']}: no ptxas log:\n{r['log']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{r['what']}: spills\n{r['log']}"
        assert r["shared"] <= MAX_SHARED[arch], f"{r['what']}: {r['shared']} bytes of shared memory"


DEFAULT = [
    ("llama3-8b", "bf16", 90),     # GQA 4, head dim 128
    ("llama2-7b", "fp16", 80),     # MHA, head dim 128
    ("smollm2-135m", "bf16", 80),  # GQA 3, head dim 64, hidden 576
    ("stories260k", "fp32", 80),   # head dim 8 padded to 16
]
SWEEP = [(m, d, a) for m in MODELS for d in DTYPES for a in (80, 90) if (m, d, a) not in DEFAULT]


@pytest.mark.parametrize("model,dtype_name,arch", DEFAULT)
def test_compiles_without_spills(capsys, model, dtype_name, arch):
    check_model(model, dtype_name, arch, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("model,dtype_name,arch", SWEEP)
def test_compiles_without_spills_sweep(capsys, model, dtype_name, arch):
    check_model(model, dtype_name, arch, capsys)


if __name__ == "__main__":  # the compiling subprocess: model dtype arch -> JSON on the last line
    print(json.dumps(compile_model(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
