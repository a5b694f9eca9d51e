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

from tests.kernels.launches import MODELS as LAUNCH_MODELS, Launch, _Recorder, bind, jit_cache_key, model_launches

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
    launches = [launch for launch in model_launches(model, DTYPES[dtype_name], phases=phases) if only in launch.what]
    return compile_launches(launches, arch)


def compile_launches(launches: list[Launch], arch: int) -> list[dict]:
    """Compile each launch; one result per distinct kernel binary."""
    results, seen = [], set()
    for launch in launches:
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
            "consts": {k: v for k, v in launch.kwargs.items()
                       if k.startswith("BLOCK_") or k in ("num_warps", "num_stages")},
            "seconds": round(time.perf_counter() - t0, 2), "log": log,
        })
    return results


def check_model(capsys, model, dtype_name, arch, phases=PHASES, only="", kinds=6) -> list[dict]:
    """Compile in a subprocess without the interpreter; assert cubins, ptxas logs, 0 spills, shared memory."""
    results = compile_in_subprocess(model, dtype_name, str(arch), ",".join(phases), only)
    check_results(capsys, f"{model:13s} {dtype_name} sm_{arch}", results, arch)
    found = {r["what"].split("/")[1].split()[0] for r in results}
    assert len(found) == kinds, f"expected {kinds} kernels to be launched, got {sorted(found)}"
    return results


def compile_in_subprocess(*argv: str) -> list[dict]:
    """This file run as the compiling subprocess with ``argv`` (see the bottom); its results."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, *argv], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_results(capsys, label: str, results: list[dict], arch: int) -> list[dict]:
    """Print one row per compiled kernel; assert cubins, ptxas logs, 0 spills, shared memory."""
    rows = [f"{label} {r['what']:55s} regs {r['regs']} spill st/ld "
            f"{r['spill_stores']}/{r['spill_loads']} smem {r['shared']} warps {r['num_warps']} {r['seconds']}s"
            for r in results]
    with capsys.disabled():
        print("\n" + "\n".join(rows))
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


# ---- kernels/quantized_matmul.py: every projection of a model, quantized, as the runtime launches it --------
QUANT_SCHEMES = {"int8": ("int8", None), "q8_0": ("int8", 32), "int4-g32": ("int4", 32),
                 "int4-g64": ("int4", 64), "int4-g128": ("int4", 128)}
QUANT_ROWS = (1, 8, 512)  # decode at batch 1 and 8, a prefill chunk
VOCAB = {"llama2-7b": 32000, "llama3-8b": 128256, "smollm2-135m": 49152}


def quant_launches(model: str, dtype: torch.dtype, scheme: str, rows=QUANT_ROWS) -> list[Launch]:
    """quant_matmul's launches (recorded on meta tensors) for the fused qkv, o, fused gate/up, down and
    LM-head projections of ``model`` quantized as ``scheme``, at each number of ``rows``; one launch
    per distinct JIT key (the same binary is compiled once)."""
    import kernels.quantized_matmul as qm
    from model.quant import QuantWeight

    m = LAUNCH_MODELS[model]
    H, Hq, Hkv, D, I = m["hidden"], m["heads"], m["kv_heads"], m["head_dim"], m["inter"]
    kind, group = QUANT_SCHEMES[scheme]
    shapes = {"qkv": ((Hq + 2 * Hkv) * D, H), "o": (H, Hq * D), "gate_up": (2 * I, H), "down": (H, I),
              "head": (VOCAB[model], H)}
    sink, saved = [], {name: getattr(qm, name) for name in ("_quant_matmul_kernel", "_split_k_sum_kernel")}
    for M in rows:
        for proj, (N, K) in shapes.items():
            G = group or K
            if K % G:  # refused at load (SmolLM2's 576 inputs in groups of 128)
                continue
            data = torch.empty(N, K if kind == "int8" else K // 2, device="meta",
                               dtype=torch.int8 if kind == "int8" else torch.uint8)
            scale = torch.empty(N, K // G, device="meta", dtype=torch.float16)
            w = QuantWeight(data, scale, torch.empty_like(scale) if kind == "int4" else None, G)
            try:
                for name, kernel in saved.items():
                    setattr(qm, name, _Recorder(kernel, f"{scheme} M{M} {proj}/{name.strip('_')}", sink))
                qm.quant_matmul_triton(torch.empty(M, K, device="meta", dtype=dtype), w)
            finally:
                for name, kernel in saved.items():
                    setattr(qm, name, kernel)
    unique = {jit_cache_key(launch): launch for launch in reversed(sink)}  # keep the first of each key
    return list(reversed(unique.values()))


def check_quant(capsys, model, dtype_name, arch, schemes=tuple(QUANT_SCHEMES)) -> list[dict]:
    results = compile_in_subprocess("quant", model, dtype_name, str(arch), ",".join(schemes))
    check_results(capsys, f"{model:13s} {dtype_name} sm_{arch}", results, arch)
    kernels = {r["what"].split("/")[1].split()[0] for r in results}
    assert kernels == {"quant_matmul_kernel", "split_k_sum_kernel"}, kernels  # a projection splits K in all 3
    return results


QUANT_SWEEP = [(m, d, a) for m in VOCAB for d in DTYPES for a in (80, 90)]


def test_quant_matmul_compiles_without_spills(capsys):
    """The default schemes (int8 per channel, int4 in groups of 64) of Llama-2-7B in bfloat16 on sm_90
    at decode (1 and 8 rows) and prefill (512 rows), with the production configs."""
    check_quant(capsys, "llama2-7b", "bf16", 90, schemes=("int8", "int4-g64"))


@pytest.mark.slow
@pytest.mark.parametrize("model,dtype_name,arch", QUANT_SWEEP)
def test_quant_matmul_compiles_without_spills_sweep(capsys, model, dtype_name, arch):
    """Every scheme (GGUF Q8_0 and int4 groups of 32 and 128 too), model, dtype and architecture."""
    check_quant(capsys, model, dtype_name, arch)


if __name__ == "__main__":  # the compiling subprocess -> JSON on the last line. Arguments: model dtype arch
    if sys.argv[1] == "quant":  # phases only; or: quant model dtype arch schemes
        _, _, model, dtype_name, arch, schemes = sys.argv
        launches = [la for scheme in schemes.split(",") for la in quant_launches(model, DTYPES[dtype_name], scheme)]
        print(json.dumps(compile_launches(launches, int(arch))))
    else:
        print(json.dumps(compile_model(sys.argv[1], sys.argv[2], int(sys.argv[3]), tuple(sys.argv[4].split(",")),
                                       sys.argv[5])))
