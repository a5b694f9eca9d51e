"""Attention of one new token per row over the static KV cache (decode), with GQA."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import launch, use_triton
from kernels.online_softmax import attend_key_range


def decode_attention_reference(q, k_cache, v_cache, kv_start, kv_end, scale: float):
    """q: [B, Hq, D]; k_cache, v_cache: [B, Hkv, S, D]; kv_start, kv_end: [B] int, the row's valid
    keys are kv_start[b] <= k < kv_end[b]. Returns [B, Hq, D]."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    n = int(kv_end.max())
    ki = torch.arange(n, device=q.device)[None, :]
    mask = (ki >= kv_start[:, None]) & (ki < kv_end[:, None])
    out = F.scaled_dot_product_attention(
        q[:, :, None], k_cache[:, :, :n], v_cache[:, :, :n],
        attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=Hq != Hkv,
    )
    return out[:, :, 0]


def decode_attention(q, k_cache, v_cache, kv_start, kv_end, scale: float):
    if use_triton(q):
        return decode_attention_triton(q, k_cache, v_cache, kv_start, kv_end, scale)
    return decode_attention_reference(q, k_cache, v_cache, kv_start, kv_end, scale)


# Flash-decoding: the cache is cut into num_splits slices of split_len keys; one program per
# (row, KV head, slice) computes a partial softmax for all query heads of that KV group, so each K/V
# block is read once; a second kernel merges the slices. The split is a run-time argument (not a
# constexpr), so one compiled kernel serves every cache length.

@triton.jit(do_not_specialize=["S", "num_splits", "split_len"])
def _decode_attention_split_kernel(
    Q, K_CACHE, V_CACHE, KV_START, KV_END, ACC, M, L,
    stride_qb, stride_qh,  # q: [B, Hq, D], unit stride along D (same for the others)
    stride_kb, stride_kh, stride_ks,  # k_cache: [B, Hkv, S, D]
    stride_vb, stride_vh, stride_vs,  # v_cache: [B, Hkv, S, D]
    HKV, GROUP, D, qk_scale,  # GROUP = Hq // Hkv; qk_scale = softmax scale * log2(e)
    S, num_splits, split_len,  # S: cache positions (keys past it are never read, whatever kv_end says)
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_G)  # query heads of this KV group, padded to >= 16 for tl.dot
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < D
    heads = hk * GROUP + offs_g

    # The row's valid keys kv_start <= k < kv_end, clipped to this program's slice (read on the
    # device, so the launch needs no host sync and can live in a CUDA graph).
    lo = tl.maximum(tl.load(KV_START + b).to(tl.int32), split * split_len)
    hi = tl.minimum(tl.minimum(tl.load(KV_END + b).to(tl.int32), (split + 1) * split_len), S)

    # The group's queries: [BLOCK_G, BLOCK_D]; every one sees all keys of [lo, hi).
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    zero = tl.zeros([BLOCK_G], dtype=tl.int32)
    acc, m_i, l_i = attend_key_range(
        acc, m_i, l_i, q, K_CACHE + b * stride_kb + hk * stride_kh, V_CACHE + b * stride_vb + hk * stride_vh,
        stride_ks, stride_vs, lo, hi, zero + lo, zero + hi - 1, qk_scale, offs_d, d_mask, BLOCK_N)

    # Partial results, float32: ACC [B, Hq, num_splits, D]; M, L [B, Hq, num_splits]. An empty slice
    # leaves m = -inf, l = 0, acc = 0.
    part = (b * HKV * GROUP + heads) * num_splits + split
    tl.store(ACC + part[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(M + part, m_i, mask=g_mask)
    tl.store(L + part, l_i, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_attention_reduce_kernel(
    ACC, M, L, OUT,
    stride_ob, stride_oh,  # out: [B, Hq, D]
    HQ, D, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (row, query head): merge the slices' partial softmaxes, BLOCK_S slices at a time
    # (a fixed tile, whatever the number of slices: no spills at long contexts).
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    first = pid.to(tl.int64) * num_splits
    # The common max over all slices.
    m_max = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        m_max = tl.maximum(m_max, tl.load(M + first + s0 + offs_s, mask=s0 + offs_s < num_splits,
                                          other=float("-inf")))
    m_top = tl.max(m_max, 0)
    m_top = tl.where(m_top == float("-inf"), 0.0, m_top)
    # Every slice rescaled to it; empty slices (m = -inf) weigh 0.
    denom = tl.zeros([BLOCK_S], dtype=tl.float32)
    out = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_mask = s0 + offs_s < num_splits
        part = first + s0 + offs_s
        w = tl.math.exp2(tl.load(M + part, mask=s_mask, other=float("-inf")) - m_top)
        denom += w * tl.load(L + part, mask=s_mask, other=0.0)
        acc = tl.load(ACC + part[:, None] * D + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        out += tl.sum(w[:, None] * acc, 0)
    total = tl.sum(denom, 0)
    out = out / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty), mask=d_mask)


def decode_config(batch: int, n_kv_heads: int, group: int, cache_len: int, head_dim: int,
                  dtype: torch.dtype) -> dict:
    """Tiles, warps and the split of the static cache length (pure: the ptxas test reuses it).
    Depends on shapes only, never on kv_start/kv_end, so the grid is fixed for a CUDA graph; the
    compile-time part (every upper-case key) does not depend on cache_len."""
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16
    block_g = max(16, triton.next_power_of_2(group))
    # Exact float32 dots run on FMA units and hold more in registers: smaller key blocks, more warps.
    block_n = 32 if dtype == torch.float32 else 64
    # Enough programs to fill a large GPU a couple of times over, slices of whole key blocks.
    max_splits = triton.cdiv(cache_len, block_n)
    splits = min(max_splits, max(1, triton.cdiv(256, batch * n_kv_heads)))
    split_len = triton.cdiv(triton.cdiv(cache_len, splits), block_n) * block_n
    splits = triton.cdiv(cache_len, split_len)
    block_s = 16
    return {"num_splits": splits, "split_len": split_len, "BLOCK_G": block_g, "BLOCK_N": block_n,
            "BLOCK_D": block_d, "num_warps": 8 if dtype == torch.float32 else 4, "num_stages": 2,
            "reduce": {"BLOCK_S": block_s, "BLOCK_D": block_d,
                       "num_warps": min(4, max(1, block_s * block_d // 512))}}


def decode_attention_triton(q, k_cache, v_cache, kv_start, kv_end, scale):
    B, Hq, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    assert Hq % Hkv == 0 and k_cache.shape[-1] == D
    if q.stride(-1) != 1:
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    cfg = decode_config(B, Hkv, Hq // Hkv, S, D, q.dtype)
    splits = cfg["num_splits"]
    acc = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
    m = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    l = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    launch(_decode_attention_split_kernel, (B * Hkv, splits), q.device,
           q, k_cache, v_cache, kv_start, kv_end, acc, m, l,
           q.stride(0), q.stride(1),
           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
           v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
           Hkv, Hq // Hkv, D, float(scale) * 1.4426950408889634, S, splits, cfg["split_len"],
           BLOCK_G=cfg["BLOCK_G"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    red = cfg["reduce"]
    launch(_decode_attention_reduce_kernel, (B * Hq,), q.device,
           acc, m, l, out, out.stride(0), out.stride(1), Hq, D, splits,
           BLOCK_S=red["BLOCK_S"], BLOCK_D=red["BLOCK_D"], num_warps=red["num_warps"])
    return out
