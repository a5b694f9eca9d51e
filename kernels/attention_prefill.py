"""Causal attention of a chunk of queries over a static KV cache (prefill), with GQA."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import launch, use_triton
from kernels.online_softmax import attend_key_range


def prefill_mask(T: int, q_start: int, kv_start: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Bool mask [B, 1, T, n_keys]: query t (cache index q_start+t) sees keys
    min(kv_start[b], q_start+t) .. q_start+t. A left-padding query (before kv_start) sees only itself,
    so that no row is fully masked."""
    qi = torch.arange(T, device=kv_start.device)[:, None] + q_start
    ki = torch.arange(n_keys, device=kv_start.device)[None, :]
    lo = torch.minimum(kv_start.view(-1, 1, 1), qi[None])
    return ((ki[None] <= qi[None]) & (ki[None] >= lo))[:, None]


def prefill_attention_reference(q, k_cache, v_cache, q_start: int, kv_start, scale: float):
    """q: [B, T, Hq, D]; k_cache, v_cache: [B, Hkv, S, D] (already holding this chunk's keys);
    q_start: cache index of q[:, 0]; kv_start: [B] int, first valid cache index of each row (left padding).
    Returns [B, T, Hq, D]."""
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    n = q_start + T
    k = k_cache[:, :, :n]
    v = v_cache[:, :, :n]
    mask = prefill_mask(T, q_start, kv_start, n)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv
    )
    return out.transpose(1, 2)


def prefill_attention(q, k_cache, v_cache, q_start: int, kv_start, scale: float):
    if use_triton(q):
        return prefill_attention_triton(q, k_cache, v_cache, q_start, kv_start, scale)
    return prefill_attention_reference(q, k_cache, v_cache, q_start, kv_start, scale)


@triton.jit
def _prefill_attention_kernel(
    Q, K_CACHE, V_CACHE, KV_START, OUT,
    stride_qb, stride_qt, stride_qh,  # q: [B, T, Hq, D], unit stride along D (same for the others)
    stride_kb, stride_kh, stride_ks,  # k_cache: [B, Hkv, S, D]
    stride_vb, stride_vh, stride_vs,  # v_cache: [B, Hkv, S, D]
    stride_ob, stride_ot, stride_oh,  # out: [B, T, Hq, D]
    T, HQ, GROUP, D,  # GROUP = Hq // Hkv query heads per KV head
    q_start, qk_scale,  # cache index of q[:, 0]; softmax scale * log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (b * Hq + h, m): queries m*BLOCK_M .. m*BLOCK_M+BLOCK_M-1 of head h in row b. B*Hq is on
    # grid axis 0 (up to 2^31 - 1 programs; axes 1 and 2 stop at 65535).
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    hk = h // GROUP  # GQA: the KV head this query head reads, shared, never copied
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)  # padded to >= 16 for tl.dot; masked beyond D
    d_mask = offs_d < D

    # Each query's cache index and the first key it sees: min(kv_start, own index), so that a
    # left-padding query sees only itself and no row is fully masked.
    q_idx = q_start + offs_m
    kv_lo = tl.load(KV_START + b).to(tl.int32)
    first_key = tl.minimum(kv_lo, q_idx)

    # Load the query tile once: [BLOCK_M, BLOCK_D].
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < T) & d_mask[None, :], other=0.0)

    # Keys someone in the tile may see: from the smallest first_key to the tile's last query.
    lo = tl.minimum(kv_lo, q_start + pid_m * BLOCK_M)
    hi = tl.minimum(q_start + (pid_m + 1) * BLOCK_M, q_start + T)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = attend_key_range(
        acc, m_i, l_i, q, K_CACHE + b * stride_kb + hk * stride_kh, V_CACHE + b * stride_vb + hk * stride_vh,
        stride_ks, stride_vs, lo, hi, first_key, q_idx, qk_scale, offs_d, d_mask, BLOCK_N)

    # Normalise and store (rows past T are padding of the tile and not stored).
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < T) & d_mask[None, :])


def prefill_config(T: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes, warps and pipeline stages (pure: the compile test reuses it)."""
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16
    if dtype == torch.float32:  # exact float32 dots run on FMA units and hold more in registers
        block_m, block_n, num_warps, num_stages = 64, 16, 8, 2
    else:
        block_m, block_n = 128, 64
        num_warps, num_stages = (4, 3) if block_d <= 32 else (8, 3)
    # Short chunks: a smaller query tile, so that fewer rows are wasted padding.
    block_m = min(block_m, max(16, triton.next_power_of_2(T)))
    if block_m <= 32:
        num_warps = 4
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d,
            "num_warps": num_warps, "num_stages": num_stages}


def prefill_grid(B: int, T: int, Hq: int, cfg: dict) -> tuple[int, int]:
    """(B * Hq, query tiles): the long axis first, as CUDA allows 2^31 - 1 programs there, 65535 on the others."""
    return (B * Hq, triton.cdiv(T, cfg["BLOCK_M"]))


def prefill_attention_triton(q, k_cache, v_cache, q_start, kv_start, scale):
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    assert Hq % Hkv == 0 and k_cache.shape[-1] == D
    assert q_start + T <= k_cache.shape[2], "the chunk does not fit the cache"
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    cfg = prefill_config(T, D, q.dtype)
    launch(_prefill_attention_kernel, prefill_grid(B, T, Hq, cfg), q.device,
           q, k_cache, v_cache, kv_start, out,
           q.stride(0), q.stride(1), q.stride(2),
           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
           v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
           out.stride(0), out.stride(1), out.stride(2),
           T, Hq, Hq // Hkv, D, int(q_start), float(scale) * 1.4426950408889634,
           BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
