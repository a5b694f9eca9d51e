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
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tests.kernels.launches import Launch, bind, model_launches

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PHASES = ("prefill", "prefill7", "decode")
# Largest shared memory one block may use (bytes): A100 (sm_80) and H100 (sm_90).
MAX_SHARED = {80: 166912, 90: 232448}


def compile_launch(launch: Launch, arch: int):
    """Compile one recorded launch the way JITFunction.run would, for `arch`; returns
    (compiled kernel, ptxas log). Fresh cache dir so that ptxas really runs and prints its log."""
    assert "enable_fp_fusion" in launch.kwargs, "launchers must set the FP-fusion option explicitly"
    fn, bound_args, specialization, options, backend = bind(launch, arch)
    options, signature, constexprs, attrs = fn._pack_args(backend, {"debug": False, **launch.kwargs}, bound_args,
                                                          specialization, options)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-compile-test-")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=options.__dict__)
    return compiled, log.getvalue()


PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")


def compile_model(model: str, dtype_name: str, arch: int, phases=PHASES, only: str = "") -> list[dict]:
    """Compile every distinct launch of `model` in `phases` (kernels whose name contains `only`); one
    result per compiled kernel."""
    results, seen = [], set()
    for launch in model_launches(model, DTYPES[dtype_name], phases=phases):
        if only not in launch.what:
            continue
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
            "consts": {k: v for k, v in launch.kwargs.items() if k.startswith("BLOCK_") or k == "num_warps"},
            "seconds": round(time.perf_counter() - t0, 2), "log": log,
        })
    return results


def check_model(capsys, model, dtype_name, arch, phases=PHASES, only="", kinds=6) -> list[dict]:
    """Compile in a subprocess without the interpreter; assert cubins, ptxas logs, 0 spills, shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, model, dtype_name, str(arch), ",".join(phases), only],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [f"{model:13s} {dtype_name} sm_{arch} {r['what']:55s} regs {r['regs']} spill st/ld "
            f"{r['spill_stores']}/{r['spill_loads']} smem {r['shared']} warps {r['num_warps']} {r['seconds']}s"
            for r in results]
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    found = {r["what"].split("/")[1].split()[0] for r in results}
    assert len(found) == kinds, f"expected {kinds} kernels to be launched, got {sorted(found)}"
    for r in results:
        assert r["cubin_bytes"] > 0, f"{r['what']}: no cubin"
        assert r["regs"] is not None and r["spill_stores"] is not None, f"{r['what']}: no ptxas log:\n{r['log']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{r['what']}: spills\n{r['log']}"
        assert r["shared"] <= MAX_SHARED[arch], f"{r['what']}: {r['shared']} bytes of shared memory"
    return results


DEFAULT = [
    ("llama3-8b", "bf16", 90),     # GQA 4, head dim 128
    ("llama2-7b", "fp16", 80),     # MHA, head dim 128
    ("smollm2-135m", "bf16", 80),  # GQA 3, head dim 64, hidden 576
    ("stories260k", "fp32", 80),   # head dim 8 padded to 16
]
MODELS = ["llama2-7b", "llama3-8b", "smollm2-135m", "stories260k"]
SWEEP = [(m, d, a) for m in MODELS for d in DTYPES for a in (80, 90) if (m, d, a) not in DEFAULT]


@pytest.mark.parametrize("model,dtype_name,arch", DEFAULT)
def test_compiles_without_spills(capsys, model, dtype_name, arch):
    check_model(capsys, model, dtype_name, arch)


@pytest.mark.parametrize("arch", [80, 90])
def test_production_prefill_tile_compiles_without_spills(capsys, arch):
    """The tile every prefill of 65+ tokens uses (BLOCK_M 128, 8 warps) at head dim 64 and 128."""
    for model in ("smollm2-135m", "llama3-8b"):
        (r,) = check_model(capsys, model, "bf16", arch, phases=("prefill",), only="prefill_attention", kinds=1)
        assert r["consts"]["BLOCK_M"] == 128 and r["num_warps"] == 8, r["consts"]


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_decode_one_kv_head_32k_compiles_without_spills(capsys, dtype_name):
    """One KV head at 32k positions: the most flash-decoding slices (the reduce kernel once spilled here)."""
    check_model(capsys, "mqa-32k", dtype_name, 90, phases=("decode",), only="decode_attention", kinds=2)


@pytest.mark.slow
@pytest.mark.parametrize("model,dtype_name,arch", SWEEP)
def test_compiles_without_spills_sweep(capsys, model, dtype_name, arch):
    check_model(capsys, model, dtype_name, arch)


if __name__ == "__main__":  # the compiling subprocess: model dtype arch phases only -> JSON on the last line
    print(json.dumps(compile_model(sys.argv[1], sys.argv[2], int(sys.argv[3]), tuple(sys.argv[4].split(",")),
                                   sys.argv[5])))
