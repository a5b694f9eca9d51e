"""Weight-only quantized matmul: x [..., K] times a ``model.quant.QuantWeight`` [N, K] -> [..., N].

One Triton kernel serves decode (M = 1..16 rows: the rows padded to one 16-row ``tl.dot`` tile, one
program per 64 output rows, split-K where a matrix has too few row blocks to fill the GPU) and prefill
(M > 16: 64 x 128 tiles, no split). Each program streams its weight rows a chunk of ``BLOCK_K`` inputs
at a time (decode: 128), read as parts of ``PART_K`` inputs that each lie inside one quantization
group, and dequantizes them in registers in float32 (int8: q * scale; int4: both nibbles of each
16-byte block, q * scale + offset), rounds them to x's dtype and multiplies on the tensor cores with
float32 accumulation (float32 x: exact dots on the FMA units). The weights are never expanded in
memory, prefill included: its 64-row tiles amortise the dequantization over 64 rows.

Numerics equal ``quant_matmul_reference`` up to float32 summation order: q * scale (+ offset) is
exact in float32 up to the one rounding of the offset add, as in ``model.quant.dequantize``; the
weight is then rounded to x's dtype (bf16/fp16: as a float model of that dtype stores it), and each
product and the sum are float32. Split-K writes float32 partial sums and a second kernel adds them in
a fixed order: no atomics, so a CUDA-graph replay equals a plain launch bit for bit.

``kernels.quant_matmul`` is the function (exported by ``kernels/__init__.py``).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import launch, use_triton
from model.quant import BLOCK, QuantWeight, dequantize

DECODE_ROWS = 16  # up to this many rows (a decode batch) take the decode config
TARGET_PROGRAMS = 264  # about two programs per SM on an H100/H200 (132 SMs; A100: 108)
MIN_CHUNKS_PER_SPLIT = 4  # split K only where each split still loops over this many chunks


def quant_matmul_reference(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x: [..., K] float; w: [N, K] quantized. Returns [..., N] in x's dtype: w dequantized by
    ``model.quant.dequantize`` to x's dtype, then multiplied in float32."""
    return F.linear(x.float(), dequantize(w, x.dtype).float()).to(x.dtype)


def quant_matmul(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """Dispatching entry point; see ``quant_matmul_reference`` for the contract."""
    if use_triton(x):
        return quant_matmul_triton(x, w)
    return quant_matmul_reference(x, w)


@triton.jit(do_not_specialize=["M", "N", "G", "CHUNKS", "ITERS"])  # one binary for every row count
def _quant_matmul_kernel(
    X, W, S, Z, OUT,  # x [M, K]; w.data [N, K] int8 or [N, K/2] uint8; scale, offset [N, K/G]; out
    stride_xm, stride_wn, stride_sn, stride_om, stride_os,  # row strides (unit stride along the last dims); split
    M, N, K, G, CHUNKS, ITERS,  # G: group size; CHUNKS = cdiv(K, BLOCK_K) in all; ITERS per split
    INT4: tl.constexpr, HAS_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PART_K: tl.constexpr,
):
    # Program (n, s, m): output rows n*BLOCK_N.. (weight rows) of input rows m*BLOCK_M.., over the
    # chunks s*ITERS .. s*ITERS+ITERS-1 of BLOCK_K inputs (all of K unless split). A chunk is read as
    # parts of PART_K inputs, each inside one group (one scale per row), all issued together.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    w_rows = W + offs_n.to(tl.int64)[None, :] * stride_wn  # [1, BLOCK_N]: weight tiles are [inputs, BLOCK_N]
    s_rows = S + offs_n.to(tl.int64) * stride_sn
    z_rows = Z + offs_n.to(tl.int64) * stride_sn
    first = pid_s * ITERS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(first, tl.minimum(first + ITERS, CHUNKS)):
        for p in tl.static_range(BLOCK_K // PART_K):
            k0 = c * BLOCK_K + p * PART_K
            # The last chunk may end early (K is a multiple of PART_K unless the weight is per-channel int8).
            live = tl.full((1,), k0, tl.int32) < K
            live_n = mask_n & live
            g = k0 // G
            scale = tl.load(s_rows + g, mask=live_n, other=0.0).to(tl.float32)[None, :]
            if HAS_OFFSET:
                offset = tl.load(z_rows + g, mask=live_n, other=0.0).to(tl.float32)[None, :]
            if INT4:
                # Byte j of a 32-input block holds input j (low nibble) and j + 16 (high nibble); a
                # part is PART_K / 32 whole blocks.
                offs_b = tl.arange(0, PART_K // 2)
                k_low = k0 + (offs_b // 16) * 32 + offs_b % 16  # the input each byte's low nibble holds
                b = tl.load(w_rows + (k0 // 2 + offs_b)[:, None], mask=live_n[None, :], other=0)
                low = (b & 0xF).to(tl.float32) * scale
                high = (b >> 4).to(tl.float32) * scale
                if HAS_OFFSET:
                    low += offset
                    high += offset
                x_low = tl.load(x_rows + k_low[None, :], mask=mask_m[:, None] & live[None, :], other=0.0)
                x_high = tl.load(x_rows + (k_low + 16)[None, :], mask=mask_m[:, None] & live[None, :], other=0.0)
                acc = tl.dot(x_low, low.to(x_low.dtype), acc, input_precision="ieee")
                acc = tl.dot(x_high, high.to(x_high.dtype), acc, input_precision="ieee")
            else:
                offs_k = k0 + tl.arange(0, PART_K)
                mask_k = offs_k < K
                q = tl.load(w_rows + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
                wt = q.to(tl.float32) * scale
                if HAS_OFFSET:
                    wt += offset
                xt = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision="ieee")
    out = OUT + pid_s.to(tl.int64) * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["MN", "SPLIT"])
def _split_k_sum_kernel(P, OUT, MN, SPLIT, BLOCK: tl.constexpr):
    # out[i] = sum over s of P[s, i] (float32, s in order), in OUT's dtype; P: [SPLIT, MN].
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(P + s * MN + offs, mask=mask, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


def part_inputs(kind: str, group_size: int, K: int, cap: int) -> int:
    """Inputs per part (``PART_K``): a power of two dividing the group (one scale per part and row),
    at most ``cap``. int8 with one group per row (per channel) takes ``cap`` (K masked)."""
    if kind == "int8" and group_size == K:
        return cap
    part = min(group_size & -group_size, cap)  # the largest power of two dividing the group
    floor = 2 * 16 if kind == "int4" else 16  # tl.dot needs K >= 16 (int4: per nibble half)
    if part < floor:
        raise ValueError(f"quant_matmul: {kind} group size {group_size} needs a power-of-two factor >= {floor} "
                         f"(int8 per channel, or groups of 16, 32, 64, ... inputs)")
    return part


def quant_matmul_config(M: int, N: int, K: int, kind: str, group_size: int, dtype: torch.dtype) -> dict:
    """Tile sizes, split-K and warps for x [M, K] times a [N, K] ``kind`` weight in groups of
    ``group_size`` (pure: the compile test and the benchmarks reuse it). Decode reads 128 inputs of
    each weight row per iteration whatever the group size (32 in float32, whose exact dots run on the
    FMA units and hold their operands in registers), so that every program keeps the same bytes in flight."""
    fp32 = dtype == torch.float32
    if M <= DECODE_ROWS:
        block_k = 32 if fp32 else 128
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 8 if fp32 else 4, "num_stages": 4}
    else:
        block_k = 32 if fp32 else 64
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64 if fp32 else 128, "num_warps": 8 if fp32 else 4, "num_stages": 3}
    cfg.update(BLOCK_K=block_k, PART_K=part_inputs(kind, group_size, K, block_k))
    return {**cfg, **split_k(M, N, K, cfg, None if M <= DECODE_ROWS else 1)}


def split_k(M: int, N: int, K: int, cfg: dict, split: int | None = None) -> dict:
    """``SPLIT_K`` and ``ITERS`` (chunks per split) for ``cfg``'s tiles: ``split`` ways, or by default
    enough programs to fill the GPU, each still looping over ``MIN_CHUNKS_PER_SPLIT`` chunks."""
    chunks = triton.cdiv(K, cfg["BLOCK_K"])
    if split is None:
        tiles = triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(M, cfg["BLOCK_M"])
        split = max(1, min(TARGET_PROGRAMS // tiles, chunks // MIN_CHUNKS_PER_SPLIT))
    iters = triton.cdiv(chunks, max(1, split))
    return {"SPLIT_K": triton.cdiv(chunks, iters), "ITERS": iters}


def quant_matmul_triton(x: torch.Tensor, w: QuantWeight, config: dict | None = None) -> torch.Tensor:
    """The Triton path (``config``: ``quant_matmul_config``'s dict, to try other tiles)."""
    N, K = w.shape
    assert x.shape[-1] == K, f"quant_matmul: x has {x.shape[-1]} inputs, the weight {K}"
    assert w.kind == "int8" or w.group_size % BLOCK == 0, "int4 groups are whole 32-input blocks"
    assert w.data.device == x.device, f"quant_matmul: x on {x.device}, the weight on {w.data.device}"
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*x.shape[:-1], N)
    data, scale = w.data.contiguous(), w.scale.contiguous()
    offset = w.offset.contiguous() if w.offset is not None else scale  # unused without HAS_OFFSET
    cfg = config or quant_matmul_config(M, N, K, w.kind, w.group_size, x.dtype)
    split = cfg["SPLIT_K"]
    dest = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), split, triton.cdiv(M, cfg["BLOCK_M"]))
    launch(_quant_matmul_kernel, grid, x.device, x2, data, scale, offset, dest,
           x2.stride(0), data.stride(0), scale.stride(0), dest.stride(-2), dest.stride(0) if split > 1 else 0,
           M, N, K, w.group_size, triton.cdiv(K, cfg["BLOCK_K"]), cfg["ITERS"],
           INT4=w.kind == "int4", HAS_OFFSET=w.offset is not None,
           BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PART_K=cfg["PART_K"],
           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1:
        launch(_split_k_sum_kernel, (triton.cdiv(M * N, 1024),), x.device, dest, out, M * N, split,
               BLOCK=1024, num_warps=4)
    return out.view(*x.shape[:-1], N)
