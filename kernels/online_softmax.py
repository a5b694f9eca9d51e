"""The inner loop both attention kernels share (Triton tutorial 06's ``_attn_fwd_inner``): a block of
queries attends to a range of cached keys with an online softmax."""

import triton
import triton.language as tl


@triton.jit
def attend_key_range(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, lo, hi, first_key, last_key,
                     qk_scale, offs_d, d_mask, BLOCK_N: tl.constexpr):
    """Online softmax (base 2) of queries q [M, BLOCK_D] over the cached keys lo <= k < hi, query row i
    seeing only those with first_key[i] <= k <= last_key[i] (both [M]). k_base, v_base: the KV head's cache
    rows (key k at k_base + k * stride_ks, unit stride along D); keys outside [lo, hi) are never read,
    so they may hold anything (NaN included). qk_scale: softmax scale * log2(e).

    Takes and returns the running state: acc [M, BLOCK_D] (unnormalised output), m_i [M] (max),
    l_i [M] (sum), all float32. A row that has seen nothing keeps m = -inf, l = 0, acc = 0."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        keys = start_n + offs_n
        in_range = (keys >= lo) & (keys < hi)
        k = tl.load(k_base + keys[None, :] * stride_ks + offs_d[:, None],
                    mask=in_range[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        qk = tl.dot(q, k, input_precision="ieee") * qk_scale
        seen = in_range[None, :] & (keys[None, :] >= first_key[:, None]) & (keys[None, :] <= last_key[:, None])
        qk = tl.where(seen, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys[:, None] * stride_vs + offs_d[None, :],
                    mask=in_range[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i
