"""Attention of one new token per row over the static KV cache (decode), with GQA."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import LAUNCH_OPTIONS, use_triton


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


# Flash-decoding: the cache is cut into NUM_SPLITS slices of SPLIT_LEN keys; one program per
# (row, KV head, slice) computes a partial softmax for all query heads of that KV group, so each K/V
# block is read once; a second kernel merges the slices.

@triton.jit
def _decode_attention_split_kernel(
    Q, K_CACHE, V_CACHE, KV_START, KV_END, ACC, M, L,
    stride_qb, stride_qh,  # q: [B, Hq, D], unit stride along D (same for the others)
    stride_kb, stride_kh, stride_ks,  # k_cache: [B, Hkv, S, D]
    stride_vb, stride_vh, stride_vs,  # v_cache: [B, Hkv, S, D]
    HKV, GROUP, D, qk_scale,  # GROUP = Hq // Hkv; qk_scale = softmax scale * log2(e)
    NUM_SPLITS: tl.constexpr, SPLIT_LEN: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_G)  # query heads of this KV group, padded to >= 16 for tl.dot
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < D
    heads = hk * GROUP + offs_g

    # The row's valid keys kv_start <= k < kv_end, clipped to this program's slice (read on the
    # device, so the launch needs no host sync and can live in a CUDA graph).
    lo = tl.maximum(tl.load(KV_START + b).to(tl.int32), split * SPLIT_LEN)
    hi = tl.minimum(tl.load(KV_END + b).to(tl.int32), (split + 1) * SPLIT_LEN)

    # The group's queries: [BLOCK_G, BLOCK_D].
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = K_CACHE + b * stride_kb + hk * stride_kh
    v_base = V_CACHE + b * stride_vb + hk * stride_vh

    # Online softmax over the slice (base 2); an empty slice leaves m = -inf, l = 0, acc = 0.
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        keys = start_n + offs_n
        valid = (keys >= lo) & (keys < hi)  # invalid keys are not read: they may hold anything
        k = tl.load(k_base + keys[None, :] * stride_ks + offs_d[:, None],
                    mask=valid[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        qk = tl.dot(q, k, input_precision="ieee") * qk_scale
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys[:, None] * stride_vs + offs_d[None, :],
                    mask=valid[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # Partial results, float32: ACC [B, Hq, NUM_SPLITS, D]; M, L [B, Hq, NUM_SPLITS].
    part = (b * HKV * GROUP + heads) * NUM_SPLITS + split
    tl.store(ACC + part[:, None] * D + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(M + part, m_i, mask=g_mask)
    tl.store(L + part, l_i, mask=g_mask)


@triton.jit
def _decode_attention_reduce_kernel(
    ACC, M, L, OUT,
    stride_ob, stride_oh,  # out: [B, Hq, D]
    HQ, D,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (row, query head): merge the slices' partial softmaxes.
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    part = pid.to(tl.int64) * NUM_SPLITS + offs_s
    m = tl.load(M + part, mask=s_mask, other=float("-inf"))
    l = tl.load(L + part, mask=s_mask, other=0.0)
    acc = tl.load(ACC + part[:, None] * D + offs_d[None, :], mask=s_mask[:, None] & (offs_d[None, :] < D),
                  other=0.0)
    # Rescale every slice to the common max; empty slices (m = -inf) weigh 0.
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_max)
    denom = tl.sum(w * l, 0)
    denom = tl.where(denom == 0.0, 1.0, denom)
    out = tl.sum(w[:, None] * acc, 0) / denom
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty),
             mask=offs_d < D)


def decode_config(batch: int, n_kv_heads: int, group: int, cache_len: int, head_dim: int,
                  dtype: torch.dtype) -> dict:
    """Tiles, warps and the split of the static cache length (pure: the compile test reuses it).
    Depends on shapes only, never on kv_start/kv_end, so the grid is fixed for a CUDA graph."""
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16
    block_g = max(16, triton.next_power_of_2(group))
    # Exact float32 dots run on FMA units and hold more in registers: smaller key blocks, more warps.
    block_n = 32 if dtype == torch.float32 else 64
    # Enough programs to fill a large GPU a couple of times over, slices of whole key blocks.
    max_splits = triton.cdiv(cache_len, block_n)
    splits = min(max_splits, max(1, triton.cdiv(256, batch * n_kv_heads)))
    split_len = triton.cdiv(triton.cdiv(cache_len, splits), block_n) * block_n
    splits = triton.cdiv(cache_len, split_len)
    block_s = triton.next_power_of_2(splits)
    return {"NUM_SPLITS": splits, "SPLIT_LEN": split_len, "BLOCK_G": block_g, "BLOCK_N": block_n,
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
    splits = cfg["NUM_SPLITS"]
    acc = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
    m = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    l = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    _decode_attention_split_kernel[(B * Hkv, splits)](
        q, k_cache, v_cache, kv_start, kv_end, acc, m, l,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Hkv, Hq // Hkv, D, float(scale) * 1.4426950408889634,
        NUM_SPLITS=splits, SPLIT_LEN=cfg["SPLIT_LEN"],
        BLOCK_G=cfg["BLOCK_G"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **LAUNCH_OPTIONS,
    )
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    red = cfg["reduce"]
    _decode_attention_reduce_kernel[(B * Hq,)](
        acc, m, l, out, out.stride(0), out.stride(1), Hq, D,
        NUM_SPLITS=splits, BLOCK_S=red["BLOCK_S"], BLOCK_D=red["BLOCK_D"],
        num_warps=red["num_warps"], **LAUNCH_OPTIONS,
    )
    return out
