"""The first-GPU check, one stage at a time (``bench/device_check.sh`` runs every stage in its own
process under its own timeout, writing ``OUT/<stage>.txt``):

    python -m bench.device_check STAGE [STAGE ...] [--out DIR] [--device cuda|cpu] [--quick]

Stages (``STAGES``): env, dispatch, graph_replay, tiles, quant_matmul, offsets64, fp32_parity,
bf16_graph_vs_plain, bf16_vs_fp32, generate_vs_hf, graph_captures. Each prints labelled result lines and
ends with one ``STAGE: PASS | FAIL | SKIP (why)`` line; the exit code is 1 if any stage failed. Stages
that need CUDA skip with a message without it; ``--device cpu --quick`` runs those that also mean
something on CPU (parity against Hugging Face, generation) on the torch references, so that CI keeps
this file working.

Models: stories260K (``$SUBLAYER_STORIES``, else ``.gpu-carry/stories260K``, else ``../shared``), random
tiny GQA Llamas made here by transformers, and random-weight shapes (``runtime.engine.load_shape``).
Only the public runtime API is used: ``runtime.load``, ``load_shape``, ``Engine.forward`` / ``logits`` /
``generate`` / ``decode_step`` / ``own_cache``, and ``runtime.fast_decode.CALLS`` (graph captures).
"""

import argparse
import os
import platform
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from model.errors import cli_main

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu-carry"  # staged by `bench/device_check.sh --stage` (listed in .git/info/exclude)
TRANSFORMERS_PINNED = ("5.20", "5.30")  # pyproject's range: the cache keyword the references use is `cache`


class Skip(Exception):
    """A stage that cannot run here (the message says why)."""


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def stories_path() -> Path:
    for p in (os.environ.get("SUBLAYER_STORIES"), CARRY / "stories260K", ROOT.parent / "shared/models/stories260K"):
        if p and (Path(p) / "config.json").exists():
            return Path(p)
    raise Skip("stories260K not found (set SUBLAYER_STORIES or run bench/device_check.sh --stage)")


def need_cuda(dev):
    if dev.type != "cuda":
        raise Skip("needs CUDA")


def hf_reference():
    """bench.hf_reference, if the transformers here is the pinned one (older ones take `past_key_values`:
    a silently different reference is worse than none)."""
    try:
        import transformers
    except ImportError as e:
        raise Skip(f"transformers not importable ({e}); run bench/device_check.sh --stage") from None
    v = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    lo, hi = (tuple(int(x) for x in s.split(".")) for s in TRANSFORMERS_PINNED)
    if not lo <= v < hi:
        raise Skip(f"transformers {transformers.__version__} is not the pinned >={TRANSFORMERS_PINNED[0]},"
                   f"<{TRANSFORMERS_PINNED[1]} (stage its wheel: bench/device_check.sh --stage)")
    import bench.hf_reference as ref

    return ref


def tiny_llama(tmp: Path, heads: int, kv_heads: int) -> Path:
    """A random Llama saved by transformers (GQA heads/kv_heads), with stories260K's tokenizer."""
    ref = hf_reference()
    ref.STORIES = stories_path()  # the tokenizer files come from the staged copy
    return ref.make_tiny_llama(tmp / f"gqa{heads // kv_heads}", 16 * heads, 2, heads, kv_heads, 96, False)


# ---- the public API ---------------------------------------------------------------------------------

def decode(engine, tokens, cache, index: int, kv_start):
    """One ``Engine.decode_step`` of tokens [B, 1] at cache index ``index`` (every row)."""
    idx = torch.full((tokens.shape[0],), index, dtype=torch.long, device=tokens.device)
    return engine.decode_step(tokens, cache, idx, kv_start)


def prefill(engine, prompt, cache):
    B, T = prompt.shape
    kv0 = torch.zeros(B, dtype=torch.int32, device=prompt.device)
    return engine.forward(prompt, cache, 0, kv0, torch.arange(T, device=prompt.device)[None].expand(B, T)), kv0


def our_steps(engine, prompt, fed):
    """Our last-position logits [V] for the prompt [1, T], then for each token of ``fed`` decoded in turn."""
    cache = engine.own_cache(1, prompt.shape[1] + len(fed))
    logits, kv0 = prefill(engine, prompt, cache)
    out = [logits[0, -1]]
    for i, t in enumerate(fed):
        tok = torch.tensor([[t]], device=prompt.device)
        out.append(decode(engine, tok, cache, prompt.shape[1] + i, kv0)[0, -1])
    return out


def random_prompt(n, vocab, dev, seed=1):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed)).to(dev)


# ---- stages ---------------------------------------------------------------------------------------

def stage_env(dev, quick):
    import triton

    lines = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})",
             f"triton {triton.__version__}"]
    try:
        import transformers
        lines.append(f"transformers {transformers.__version__} from {Path(transformers.__file__).parent.parent}")
    except ImportError as e:
        lines.append(f"transformers: not importable ({e})")
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        lines += [f"device {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                  f"bf16 {torch.cuda.is_bf16_supported()}", f"devices visible: {torch.cuda.device_count()}"]
    else:
        lines.append("device: no CUDA (CUDA stages skip)")
    return lines


def stage_dispatch(dev, quick):
    """Every kernels.* op on CUDA tensors reaches Triton, never the torch reference (counted)."""
    need_cuda(dev)
    import runtime
    from kernels import activation, attention_decode, attention_prefill, rmsnorm, rotary
    from runtime.engine import load_shape

    calls = {}
    saved = []

    def count(module, name, fn):
        def counted(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)
        saved.append((module, name, fn))
        setattr(module, name, counted)

    for module in (activation, attention_decode, attention_prefill, rmsnorm, rotary):
        for name, fn in list(vars(module).items()):
            if name.endswith(("_reference", "_triton")) and getattr(fn, "__module__", None) == module.__name__:
                count(module, name, fn)
        count(module, "launch", module.launch)  # each kernel module's own binding of dispatch.launch
    try:
        for engine in (runtime.load(str(stories_path()), dtype="bfloat16", device=dev, show_progress=False),
                       load_shape("llama2-7b", dtype="bfloat16", device=dev, max_seq_len=64)
                       if not quick else None):
            if engine is None:
                continue
            prompt = random_prompt(20, engine.config.vocab_size, dev)
            cache = engine.own_cache(1, 40)
            _, kv0 = prefill(engine, prompt, cache)
            for i in range(3):
                decode(engine, prompt[:, -1:], cache, 20 + i, kv0)
            del engine
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
    lines = [f"{k}: {v} calls" for k, v in sorted(calls.items())]
    refs = {k: v for k, v in calls.items() if k.endswith("_reference")}
    assert not refs, f"CUDA tensors reached the torch references: {refs}"
    assert calls.get("launch", 0) > 0 and calls.get("decode_attention_triton", 0) > 0, calls
    return lines


def stage_graph_replay(dev, quick):
    """One captured decode step (fp32, stories260K) replayed at many cache indices over a cache filled
    by a prefill, against the torch reference (a CPU engine on a copy of the same cache)."""
    need_cuda(dev)
    import runtime

    path = str(stories_path())
    S = 512
    gpu = runtime.load(path, dtype="float32", device=dev, max_seq_len=S, show_progress=False)
    cpu = runtime.load(path, dtype="float32", device="cpu", compile=False, show_progress=False)
    cache = gpu.own_cache(1, S)
    prompt = random_prompt(S, gpu.config.vocab_size, dev)
    _, kv0 = prefill(gpu, prompt, cache)
    ref_cache = cpu.new_cache(1, S)
    worst, lines = 0.0, []
    for index in (0, 1, 15, 16, 63, 64, 65, 127, 128, 255, 256, 300, 447, 448, 500, 511):
        ref_cache.k.copy_(cache.k)
        ref_cache.v.copy_(cache.v)
        tok = prompt[:, index:index + 1]
        ours = decode(gpu, tok, cache, index, kv0)[0, -1].float().cpu()
        ref = decode(cpu, tok.cpu(), ref_cache, index, kv0.cpu())[0, -1]
        err = rel_err(ours, ref)
        worst = max(worst, err)
        lines.append(f"index {index:3d}: relative error {err:.2e}")
    captures = graph_captures()
    lines.append(f"worst {worst:.2e}; graph captures {captures}")
    assert worst < 1e-4, f"graph replay vs reference: {worst:.2e}"
    return lines


def stage_tiles(dev, quick):
    """The production tiles on real head dims: prefill 513/300/1024 tokens (BLOCK_M 128, 8 warps in
    bf16), decode at 4096 positions, against the torch references in float32."""
    need_cuda(dev)
    from kernels import attention_decode, attention_prefill

    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
    gen = torch.Generator(device=dev).manual_seed(0)
    lines = []
    for dtype in (torch.bfloat16, torch.float32):
        for D, Hq, Hkv in ((64, 9, 3), (128, 32, 8)):
            for T in (513, 300, 1024):
                q = torch.randn(1, T, Hq, D, generator=gen, device=dev).to(dtype)
                kc, vc = (torch.randn(1, Hkv, T + 8, D, generator=gen, device=dev).to(dtype) for _ in range(2))
                kv0 = torch.tensor([5], device=dev)
                out = attention_prefill.prefill_attention_triton(q, kc, vc, 0, kv0, D ** -0.5)
                ref = attention_prefill.prefill_attention_reference(q.float(), kc.float(), vc.float(), 0, kv0, D ** -0.5)
                err = rel_err(out, ref)
                lines.append(f"prefill {dtype} D{D} T{T}: {err:.2e}")
                assert err < tol[dtype], lines[-1]
            S = 4096
            q = torch.randn(2, Hq, D, generator=gen, device=dev).to(dtype)
            kc, vc = (torch.randn(2, Hkv, S, D, generator=gen, device=dev).to(dtype) for _ in range(2))
            kvs, kve = torch.tensor([0, 100], device=dev), torch.tensor([4096, 3001], device=dev, dtype=torch.int32)
            out = attention_decode.decode_attention_triton(q, kc, vc, kvs, kve, D ** -0.5)
            ref = attention_decode.decode_attention_reference(q.float(), kc.float(), vc.float(), kvs, kve, D ** -0.5)
            err = rel_err(out, ref)
            lines.append(f"decode {dtype} D{D} S{S}: {err:.2e}")
            assert err < tol[dtype], lines[-1]
    return lines


# (N, K) of each projection (fused qkv, o, fused gate/up, down), from the checkpoints' config.json
QUANT_SHAPES = {
    "smollm2-135m": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)},
    "llama2-7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)},
}
QUANT_SCHEMES = {"int8": ("int8", None), "q8_0": ("int8", 32), "int4-g32": ("int4", 32), "int4-g64": ("int4", 64),
                 "int4-g128": ("int4", 128)}
# Kernel and reference round the same dequantized weights to x's dtype and sum in float32: they differ
# only by summation order, i.e. in the odd output rounded to the neighbouring bf16/fp16 value.
QUANT_TOL = 2e-3
QUANT_DTYPES = (torch.bfloat16, torch.float16)
QUANT_PREFILL = ("llama2-7b", 512)  # model and rows of the prefill timing


def stage_quant_matmul(dev, quick):
    """kernels.quant_matmul on every scheme and projection of SmolLM2-135M and Llama-2-7B: against its
    reference (dequantize, multiply in float32) in bf16 and fp16 at 1, 8 and 100 rows, then timed at
    1 row against bf16 ``F.linear`` of the same (dequantized) weights, each launch replayed from a CUDA
    graph as decode runs it, L2 flushed between runs (``triton.testing.do_bench``): GB/s of the bytes
    each reads. Other tiles (64-row blocks unsplit, 32 and 128 rows per block) for int8 and int4-g64;
    Llama-2-7B's prefill of 512 rows against bf16 F.linear and against dequantize + F.linear. Lines
    are yielded as they are measured."""
    need_cuda(dev)
    import torch.nn.functional as F

    from bench.latency import copy_bandwidth
    from kernels.quantized_matmul import quant_matmul_config, quant_matmul_reference, quant_matmul_triton, split_k
    from model.quant import dequantize, quantize

    gen = torch.Generator(device=dev).manual_seed(0)
    weights, bad = {}, []
    for model, shapes in QUANT_SHAPES.items():
        worst = {}
        for proj, (N, K) in shapes.items():
            w = torch.randn(N, K, generator=gen, device=dev) * 0.02
            for scheme, (kind, group) in QUANT_SCHEMES.items():
                if K % (group or K):
                    continue
                q = weights[model, proj, scheme] = quantize(w, kind, group)
                for dtype in QUANT_DTYPES:
                    for M in (1, 8, 100):
                        x = torch.randn(M, K, generator=gen, device=dev).to(dtype)
                        err = rel_err(quant_matmul_triton(x, q), quant_matmul_reference(x, q))
                        key = (str(dtype)[6:], scheme)
                        worst[key] = max(worst.get(key, (0.0, "")), (err, f"{proj} M={M}"))
            del w
        for (dtype, scheme), (err, where) in sorted(worst.items()):
            line = f"parity {model} {dtype} {scheme}: worst relative error {err:.2e} ({where})"
            yield line
            if err > QUANT_TOL:
                bad.append(line)

    peak = copy_bandwidth(dev)
    yield (f"copy bandwidth (read + write of 256 MiB): {peak / 1e9:.0f} GB/s; times: median, L2 flushed, "
           "graph replay")
    x1 = {K: torch.randn(1, K, generator=gen, device=dev).to(torch.bfloat16)
          for shapes in QUANT_SHAPES.values() for _, K in shapes.values()}
    for model, shapes in QUANT_SHAPES.items():
        for proj, (N, K) in shapes.items():
            x = x1[K]
            dense = dequantize(weights[model, proj, "int8"], torch.bfloat16)
            t_dense = graph_time(lambda d=dense: F.linear(x, d))
            nbytes = dense.numel() * 2
            yield (f"{model} {proj} [{N}x{K}] bf16 F.linear: {t_dense * 1e6:7.1f} us "
                   f"{nbytes / t_dense / 1e9:6.0f} GB/s ({nbytes / 2**20:.1f} MiB)")
            del dense
            for scheme in QUANT_SCHEMES:
                q = weights.get((model, proj, scheme))
                if q is None:
                    continue
                cfg = quant_matmul_config(1, N, K, q.kind, q.group_size, torch.bfloat16)
                tiles = {"default": cfg}
                if scheme in ("int8", "int4-g64") and not quick:
                    tiles["unsplit"] = {**cfg, **split_k(1, N, K, cfg, 1)}
                    for bn in (32, 128):
                        other = {**cfg, "BLOCK_N": bn}
                        tiles[f"BLOCK_N {bn}"] = {**other, **split_k(1, N, K, other)}
                for name, c in tiles.items():
                    if name != "default" and c == cfg:
                        continue
                    t = graph_time(lambda: quant_matmul_triton(x, q, c))
                    yield (f"{model} {proj} [{N}x{K}] {scheme:9s} {name:11s} split {c['SPLIT_K']}: "
                           f"{t * 1e6:7.1f} us {q.nbytes / t / 1e9:6.0f} GB/s ({q.nbytes / 2**20:.1f} MiB, "
                           f"{100 * q.nbytes / t / peak:.0f}% of copy), {t_dense / t:.2f}x F.linear")
    # Prefill: the tiled kernel over the quantized weights against bf16 F.linear and against expanding
    # the weights first (dequantize, then F.linear), the alternative it was chosen over.
    model, M = QUANT_PREFILL
    for proj, (N, K) in QUANT_SHAPES[model].items() if not quick else ():
        x = torch.randn(M, K, generator=gen, device=dev).to(torch.bfloat16)
        dense = dequantize(weights[model, proj, "int8"], torch.bfloat16)
        t_dense = graph_time(lambda d=dense: F.linear(x, d))
        del dense
        line = f"{model} {proj} [{N}x{K}] prefill {M} rows: bf16 F.linear {t_dense * 1e6:.1f} us"
        for scheme in ("int8", "int4-g64"):
            q = weights[model, proj, scheme]
            t = graph_time(lambda: quant_matmul_triton(x, q))
            t_expand = graph_time(lambda: F.linear(x, dequantize(q, torch.bfloat16)))
            line += (f"; {scheme} quant_matmul {t * 1e6:.1f} us ({2 * M * N * K / t / 1e12:.0f} TFLOP/s), "
                     f"dequantize + F.linear {t_expand * 1e6:.1f} us")
        yield line
    assert not bad, bad


def graph_time(fn) -> float:
    """Seconds per call of ``fn`` replayed from a CUDA graph (median, L2 flushed before each replay)."""
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=5, rep=30, return_mode="median") * 1e-3


def stage_offsets64(dev, quick):
    """KV slots past 2^31 elements (64-bit offsets): rows of 2^30 elements, the third starting at 2^31.
    The cache is NaN except for the window used at its very end, so a wrong offset reads NaN or
    writes elsewhere; results equal those of the same kernels on a small copy of the window."""
    need_cuda(dev)
    import kernels

    B, Hq, Hkv, D, S, W = 3, 2, 1, 128, 2**23, 64
    dtype = torch.float32  # 2 x 12.9 GB of cache
    kc, vc = (torch.full((B, Hkv, S, D), float("nan"), dtype=dtype, device=dev) for _ in range(2))
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, W, h, D, generator=gen, device=dev).to(dtype) for h in (Hq, Hkv, Hkv))
    cos, sin = kernels.rope_tables(kernels.rope_inv_freq(D, 10000.0), W, device=dev)
    pos = torch.arange(W, device=dev)[None].expand(B, W)
    start = S - W
    kv_start = torch.full((B,), start, device=dev)
    q_big = kernels.rotary_write_kv(q, k, v, cos, sin, pos, kc, vc, start)
    out_big = kernels.prefill_attention(q_big, kc, vc, start, kv_start, D ** -0.5)
    dec_big = kernels.decode_attention(q_big[:, -1], kc, vc, kv_start, torch.full((B,), S, device=dev), D ** -0.5)
    small_k, small_v = (torch.full((B, Hkv, W, D), float("nan"), dtype=dtype, device=dev) for _ in range(2))
    q_small = kernels.rotary_write_kv(q, k, v, cos, sin, pos, small_k, small_v, 0)
    zero = torch.zeros(B, dtype=torch.long, device=dev)
    out_small = kernels.prefill_attention(q_small, small_k, small_v, 0, zero, D ** -0.5)
    dec_small = kernels.decode_attention(q_small[:, -1], small_k, small_v, zero, torch.full((B,), W, device=dev),
                                         D ** -0.5)
    assert torch.equal(kc[:, :, start:], small_k) and torch.equal(vc[:, :, start:], small_v), "cache writes differ"
    assert kc[:, :, :start].isnan().all(), "wrote outside the window"
    lines = [f"cache [{B}, {Hkv}, {S}, {D}] = {B * Hkv * S * D / 2**31:.1f} x 2^31 elements",
             f"prefill vs small copy: {rel_err(out_big, out_small):.2e}",
             f"decode vs small copy: {rel_err(dec_big, dec_small):.2e}"]
    assert torch.isfinite(out_big).all() and torch.isfinite(dec_big).all(), "NaN read"
    assert rel_err(out_big, out_small) < 1e-5 and rel_err(dec_big, dec_small) < 1e-5, lines
    return lines


def stage_fp32_parity(dev, quick):
    """float32 prefill + 40 decode steps (the graph on CUDA) against Hugging Face within 1e-4 on
    stories260K and random GQA 3/4/8 Llamas; decode steps against our own prefill within 1e-4."""
    ref = hf_reference()
    import runtime

    steps = 3 if quick else 40
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"stories260K": stories_path()}
        shapes = ((8, 2),) if quick else ((6, 2), (8, 2), (8, 1))
        paths.update({f"gqa{h // kv}": tiny_llama(Path(tmp), h, kv) for h, kv in shapes})
        for name, path in paths.items():
            engine = runtime.load(str(path), dtype="float32", device=dev, compile=not quick, show_progress=False)
            hf = ref.hf_model(path, torch.float32).to(dev)
            prompt = random_prompt(24, engine.config.vocab_size, dev)
            hf_logits, fed = ref.hf_prefill_decode(hf, prompt, steps)
            ours = our_steps(engine, prompt, fed)
            errs = [rel_err(a, b) for a, b in zip(ours, hf_logits)]
            full = engine.logits(torch.cat([prompt, torch.tensor([fed], device=dev)], 1))[0, prompt.shape[1] - 1:]
            self_errs = [rel_err(a, b) for a, b in zip(ours, full)]
            lines.append(f"{name}: vs HF prefill {errs[0]:.2e}, worst decode {max(errs[1:]):.2e}; "
                         f"decode vs own prefill worst {max(self_errs):.2e}")
            assert max(errs) < 1e-4 and max(self_errs) < 1e-4, lines[-1]
            del engine, hf
    return lines


def stage_bf16_graph_vs_plain(dev, quick):
    """bfloat16 decode steps replayed from the CUDA graph are bit-identical to plain launches."""
    need_cuda(dev)
    import runtime

    path = str(stories_path())
    graph = runtime.load(path, dtype="bfloat16", device=dev, max_seq_len=128, show_progress=False)
    plain = runtime.load(path, dtype="bfloat16", device=dev, max_seq_len=128, compile=False, show_progress=False)
    prompt = random_prompt(16, graph.config.vocab_size, dev)
    outs = []
    for engine in (graph, plain):
        cache = engine.own_cache(1, 128)
        _, kv0 = prefill(engine, prompt, cache)
        tok, out = prompt[:, -1:], []
        for i in range(30):
            logits = decode(engine, tok, cache, 16 + i, kv0)
            out.append(logits)
            tok = logits[:, -1].argmax(-1, keepdim=True)
        outs.append(torch.cat(out, 1))
    same = torch.equal(outs[0], outs[1])
    lines = [f"30 steps bit-identical: {same}; max abs difference {(outs[0] - outs[1]).abs().max().item():.3g}",
             f"graph captures {graph_captures()}"]
    assert same, lines[0]
    return lines


def stage_bf16_vs_fp32(dev, quick):
    """bfloat16 error against a float32 reference, relative to Hugging Face bfloat16's own error against
    the same reference (stories260K): see ``bf16_vs_fp32``."""
    return bf16_vs_fp32(dev, stories_path(), 32 if quick else 256)


def bf16_vs_fp32(dev, path: Path, T: int) -> list[str]:
    """Our bfloat16 logits and HF's for T random tokens, each against HF float32: ours <= 2x HF's
    relative logit error + 1e-3, top-1 disagreement <= 2x HF's + 1% (``bf16_verdict``)."""
    ref = hf_reference()
    import runtime

    hf32 = ref.hf_model(path, torch.float32).to(dev)
    ids = random_prompt(T, hf32.config.vocab_size, dev, seed=3)
    with torch.inference_mode():
        truth = hf32(ids).logits[0].float()
        del hf32
        hf16 = ref.hf_model(path, torch.bfloat16).to(dev)(ids).logits[0].float()
    ours = runtime.load(str(path), dtype="bfloat16", device=dev, show_progress=False).logits(ids)[0]
    v = bf16_verdict(ours, hf16, truth)
    lines = [f"{path.name}, {T} tokens:",
             f"HF bf16 vs fp32: relative error {v['hf_err']:.3e}, top-1 disagreement {v['hf_disagree']:.3%}",
             f"ours bf16 vs fp32: relative error {v['ours_err']:.3e}, top-1 disagreement {v['ours_disagree']:.3%}"]
    assert v["ok"], lines
    return lines


def bf16_verdict(ours, hf_bf16, truth) -> dict:
    """Judge ours [T, V] against the float32 ``truth`` relative to HF bf16's error against it."""
    top = truth.argmax(-1)
    v = {"ours_err": rel_err(ours, truth), "hf_err": rel_err(hf_bf16, truth),
         "ours_disagree": (ours.argmax(-1) != top).float().mean().item(),
         "hf_disagree": (hf_bf16.argmax(-1) != top).float().mean().item()}
    v["ok"] = v["ours_err"] <= 2 * v["hf_err"] + 1e-3 and v["ours_disagree"] <= 2 * v["hf_disagree"] + 0.01
    return v


def stage_generate_vs_hf(dev, quick):
    """Batched greedy generation (3 prompts of different lengths, left-padded) against Hugging Face's
    greedy decoding of each prompt alone (float32, stories260K)."""
    ref = hf_reference()
    import runtime

    path = stories_path()
    n = 4 if quick else 32
    engine = runtime.load(str(path), dtype="float32", device=dev, compile=not quick, show_progress=False)
    hf = ref.hf_model(path, torch.float32).to(dev)
    prompts = [random_prompt(L, engine.config.vocab_size, dev, seed=L)[0].tolist() for L in (5, 17, 11)]
    ours = engine.generate(prompts, max_new_tokens=n, stop_at_eos=False).tokens
    lines = []
    for p, o in zip(prompts, ours):
        with torch.inference_mode():
            g = hf.generate(torch.tensor([p], device=dev), max_new_tokens=n, do_sample=False, min_new_tokens=n)
        theirs = g[0, len(p):].tolist()
        lines.append(f"prompt of {len(p)}: {sum(a == b for a, b in zip(o, theirs))}/{n} tokens equal")
        assert o == theirs, lines[-1]
    return lines


def graph_captures() -> int:
    from runtime.fast_decode import CALLS

    return CALLS["graph capture"]


def stage_graph_captures(dev, quick):
    """One capture per engine cache: generating twice at one batch size and max_seq_len captures once,
    scoring (logits) never."""
    need_cuda(dev)
    import runtime
    from runtime.fast_decode import CALLS

    engine = runtime.load(str(stories_path()), dtype="bfloat16", device=dev, max_seq_len=96, show_progress=False)
    before = CALLS["graph capture"]
    for _ in range(2):
        engine.generate([[5, 6, 7]], max_new_tokens=10, stop_at_eos=False)
    after_generate = CALLS["graph capture"] - before
    engine.logits([5])
    engine.logits([5, 6, 7, 8])
    after_logits = CALLS["graph capture"] - before
    lines = [f"captures after 2 generate calls: {after_generate}; after 2 logits calls: {after_logits}",
             f"replays: {CALLS['graph replay']}"]
    assert after_generate == 1 and after_logits == 1, lines[0]
    return lines


STAGES = {name[len("stage_"):]: fn for name, fn in globals().items() if name.startswith("stage_")}


def run_stage(name, dev, quick, out: Path | None) -> str:
    """Run one stage; print and (with ``out``) write its lines and verdict. Returns PASS, FAIL or SKIP.
    A stage returns its lines, or yields them: those print as they come, so that a stage stopped by
    its timeout still leaves what it measured."""
    lines = []

    def say(line):
        print(line, flush=True)
        lines.append(line)

    try:
        with torch.inference_mode():
            for line in STAGES[name](dev, quick):
                say(line)
        verdict = "PASS"
    except Skip as e:
        verdict = f"SKIP ({e})"
    except Exception as e:  # a failed check or a crash: the stage fails, the others still run
        say("".join(traceback.format_exception(e)).rstrip())
        verdict = "FAIL"
    say(f"{name}: {verdict}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return verdict.split()[0]


@cli_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stages", nargs="*", help=f"any of {', '.join(STAGES)} (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer steps and models (the CPU smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="write STAGE.txt files here")
    args = ap.parse_args(argv)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {', '.join(unknown)}; expected any of {', '.join(STAGES)}")
    dev = torch.device(args.device)
    verdicts = [run_stage(s, dev, args.quick, args.out) for s in args.stages or STAGES]
    return 1 if "FAIL" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
