"""Kernel benchmark: achieved GB/s of each Triton kernel next to torch eager (the references)
and the card's measured copy bandwidth.

    python -m bench.kernels [--dtype bfloat16] [--model llama3-8b]

Bytes counted are the bytes an ideal kernel must move (read + written). Times are medians of
triton.testing.do_bench. Needs CUDA.
"""

import argparse
import sys

import torch

from bench.latency import copy_bandwidth
from kernels import activation as swi, attention_decode as dec, attention_prefill as pre, rmsnorm as rms, rotary as rot
from model.errors import UserError, cli_main
from model.shapes import SHAPES, shape_config


def bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3  # seconds


def cases(model: str, dtype: torch.dtype, batch: int, prompt: int, context: int, cache_len: int):
    """(name, triton call, torch eager call, bytes moved) per kernel and phase."""
    c = shape_config(model)
    H, Hq, Hkv, D, I = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    e = torch.empty((), dtype=dtype).element_size()
    dev = dict(device="cuda", dtype=dtype)
    out = []
    for phase, T in (("decode", 1), ("prefill", prompt)):
        N = batch * T
        x, r, w = torch.randn(N, H, **dev), torch.randn(N, H, **dev), torch.randn(H, **dev)
        out.append((f"add_rmsnorm {phase} [{N}x{H}]", lambda x=x, r=r, w=w: rms.add_rmsnorm_triton(x, r, w, 1e-5),
                    lambda x=x, r=r, w=w: rms.add_rmsnorm_reference(x, r, w, 1e-5), (4 * N * H + H) * e))
        gu = torch.randn(N, 2 * I, **dev)
        out.append((f"swiglu {phase} [{N}x{2 * I}]", lambda gu=gu: swi.swiglu_triton(gu),
                    lambda gu=gu: swi.swiglu_reference(gu), 3 * N * I * e))
        qkv = torch.randn(batch, T, Hq + 2 * Hkv, D, **dev)
        q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
        cos, sin = rot.rope_tables(rot.rope_inv_freq(D, 500000.0), cache_len, device="cuda")
        pos = torch.arange(T, device="cuda").expand(batch, T) + (context if phase == "decode" else 0)
        kc, vc = torch.zeros(batch, Hkv, cache_len, D, **dev), torch.zeros(batch, Hkv, cache_len, D, **dev)
        start = context if phase == "decode" else 0
        rot_bytes = 2 * N * (Hq + 2 * Hkv) * D * e + 2 * N * D * 4  # q, k, v in and out, cos/sin rows
        out.append((f"rotary_write_kv {phase} [B{batch} T{T}]",
                    lambda q=q, k=k, v=v, pos=pos, kc=kc, vc=vc, s=start:
                        rot.rotary_write_kv_triton(q, k, v, cos, sin, pos, kc, vc, s),
                    lambda q=q, k=k, v=v, pos=pos, kc=kc, vc=vc, s=start:
                        rot.rotary_write_kv_reference(q, k, v, cos, sin, pos, kc, vc, s), rot_bytes))
    # Attention: caches filled up to the context.
    kc, vc = torch.randn(batch, Hkv, cache_len, D, **dev), torch.randn(batch, Hkv, cache_len, D, **dev)
    kv_start = torch.zeros(batch, dtype=torch.int64, device="cuda")
    kv_end = torch.full((batch,), context, dtype=torch.int64, device="cuda")
    qd = torch.randn(batch, Hq, D, **dev)
    out.append((f"decode_attention [B{batch} ctx {context} of {cache_len}]",
                lambda: dec.decode_attention_triton(qd, kc, vc, kv_start, kv_end, D ** -0.5),
                lambda: dec.decode_attention_reference(qd, kc, vc, kv_start, kv_end, D ** -0.5),
                (2 * batch * Hkv * context * D + 2 * batch * Hq * D) * e))
    qp = torch.randn(batch, prompt, Hq, D, **dev)
    out.append((f"prefill_attention [B{batch} T{prompt}]",
                lambda: pre.prefill_attention_triton(qp, kc, vc, 0, kv_start, D ** -0.5),
                lambda: pre.prefill_attention_reference(qp, kc, vc, 0, kv_start, D ** -0.5),
                (2 * batch * prompt * Hq * D + 2 * batch * Hkv * prompt * D) * e))
    return out


@cli_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--context", type=int, default=2048, help="keys a decode step attends to")
    ap.add_argument("--cache-len", type=int, default=4096, help="static KV cache length")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("bench.kernels needs a CUDA GPU (Triton kernels do not run natively on CPU); none found")
    dtype = getattr(torch, args.dtype)
    peak = copy_bandwidth("cuda")
    print(f"device: {torch.cuda.get_device_name()}; model shapes: {args.model}; dtype: {args.dtype}")
    print(f"copy bandwidth (read + write of 256 MiB): {peak / 1e9:.1f} GB/s")
    print(f"{'kernel':48s} {'bytes':>10s} {'triton':>22s} {'torch eager':>22s} {'speedup':>8s}")
    for name, tri, ref, nbytes in cases(args.model, dtype, args.batch, args.prompt, args.context,
                                        args.cache_len):
        t_tri, t_ref = bench(tri), bench(ref)
        g_tri, g_ref = nbytes / t_tri / 1e9, nbytes / t_ref / 1e9
        print(f"{name:48s} {nbytes / 2**20:8.2f}Mi {t_tri * 1e6:8.1f} us {g_tri:7.1f} GB/s "
              f"{t_ref * 1e6:8.1f} us {g_ref:7.1f} GB/s {t_ref / t_tri:7.2f}x"
              f"   ({100 * g_tri * 1e9 / peak:.0f}% of copy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
