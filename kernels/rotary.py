"""Rotary position embedding (Hugging Face rotate-half convention) fused with the KV-cache write.

Also builds the cos/sin tables, including Llama-3 rope scaling.
"""

import math

import torch
import triton
import triton.language as tl

from kernels.dispatch import launch, use_triton


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, with Llama-3 scaling applied if asked."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope scaling type {kind!r} is not supported")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(inv_freq: torch.Tensor, max_pos: int, device=None):
    """cos, sin: [max_pos, head_dim] float32, HF layout cat(freqs, freqs)."""
    pos = torch.arange(max_pos, dtype=torch.float32, device=device)
    freqs = pos[:, None] * inv_freq.to(device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    """cat(-x2, x1) of the halves x1, x2 of the last dimension, written as an index swap and a sign so
    that a compiler fuses it into its consumer (a cat is materialised: a loop and a barrier more per
    rotated tensor in each compiled decode step)."""
    D = x.shape[-1]
    swapped = x.unflatten(-1, (2, D // 2)).flip(-2).flatten(-2)
    return torch.where(torch.arange(D, device=x.device) < D // 2, -swapped, swapped)


def rotary_write_kv_reference(q, k, v, cos, sin, positions, k_cache, v_cache, cache_start):
    """Rotate q and k, and write rotated k and v into the cache.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; cos, sin: [P, D] float32 tables;
    positions: [B, T] int64 rotary positions (per row); k_cache, v_cache: [B, Hkv, S, D];
    cache_start: cache index of token 0, an int (every row) or an integer tensor of 1 or B elements
    (per row; written by index, without a host sync: an index past the cache raises IndexError, a
    negative one wraps as torch indexing does, so callers check their indices).
    Writes row b's tokens at cache indices cache_start[b] .. cache_start[b]+T-1; returns rotated q [B, T, Hq, D].
    """
    c = cos[positions].to(q.dtype)[:, :, None, :]
    s = sin[positions].to(q.dtype)[:, :, None, :]
    q_rot = q * c + _rotate_half(q) * s
    k_rot = k * c + _rotate_half(k) * s
    B, T = q.shape[:2]
    if isinstance(cache_start, torch.Tensor):
        rows = torch.arange(B, device=q.device)[:, None]
        cols = cache_start.reshape(-1, 1).expand(B, 1) + torch.arange(T, device=q.device)[None]
        k_cache[rows, :, cols] = k_rot  # [B, T, Hkv, D] at (b, :, cache_start[b] + t)
        v_cache[rows, :, cols] = v
    else:
        check_write_window(cache_start, T, k_cache.shape[2])
        k_cache[:, :, cache_start:cache_start + T] = k_rot.transpose(1, 2)
        v_cache[:, :, cache_start:cache_start + T] = v.transpose(1, 2)
    return q_rot


def check_write_window(cache_start: int, T: int, S: int):
    """IndexError unless cache indices cache_start .. cache_start+T-1 lie in a cache of S positions."""
    if not 0 <= cache_start <= S - T:
        raise IndexError(f"KV-cache write at indices {cache_start}..{cache_start + T - 1} is outside the cache "
                         f"(0..{S - 1})")


def rotary_write_kv(q, k, v, cos, sin, positions, k_cache, v_cache, cache_start):
    if use_triton(q):
        return rotary_write_kv_triton(q, k, v, cos, sin, positions, k_cache, v_cache, cache_start)
    return rotary_write_kv_reference(q, k, v, cos, sin, positions, k_cache, v_cache, cache_start)


@triton.jit(do_not_specialize=["START", "S"])  # one compiled kernel for every cache index and length
def _rotary_write_kv_kernel(
    Q, K, V, COS, SIN, POS, Q_OUT, K_CACHE, V_CACHE, START,
    stride_qb, stride_qt, stride_qh,  # q: [B, T, Hq, D], unit stride along D (same for the others)
    stride_kb, stride_kt, stride_kh,  # k: [B, T, Hkv, D]
    stride_vb, stride_vt, stride_vh,  # v: [B, T, Hkv, D]
    stride_cos, stride_pb, stride_pt,  # cos/sin rows; positions [B, T]
    stride_ob, stride_ot, stride_oh,  # rotated q out: [B, T, Hq, D]
    stride_cb, stride_ch, stride_cs,  # caches: [B, Hkv, S, D] (k_cache and v_cache share strides)
    T, HQ, HKV, D, S,  # S: cache positions; writes outside 0..S-1 are dropped, never made
    stride_start,  # START's row stride (0: one index for every row)
    START_IS_PTR: tl.constexpr,  # START points to the cache index per row (CUDA-graph friendly), or is an int
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token (b, t); it handles every q, k and v head of that token.
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = pid % T
    half = D // 2
    if START_IS_PTR:
        start = tl.load(START + b * stride_start).to(tl.int32)
    else:
        start = START
    # The rotary row of this token, cast to the activation dtype as Hugging Face does.
    pos = tl.load(POS + b * stride_pb + t * stride_pt).to(tl.int64)
    dh = tl.arange(0, BLOCK_HALF)
    dmask = dh < half
    cos_row = COS + pos * stride_cos
    sin_row = SIN + pos * stride_cos
    dtype = Q.dtype.element_ty
    c1 = tl.load(cos_row + dh, mask=dmask, other=0.0).to(dtype)[None, :]
    c2 = tl.load(cos_row + half + dh, mask=dmask, other=0.0).to(dtype)[None, :]
    s1 = tl.load(sin_row + dh, mask=dmask, other=0.0).to(dtype)[None, :]
    s2 = tl.load(sin_row + half + dh, mask=dmask, other=0.0).to(dtype)[None, :]

    # q: rotate-half, x * cos + cat(-x2, x1) * sin, written to a fresh tensor.
    hq = tl.arange(0, BLOCK_HQ)[:, None]
    mq = (hq < HQ) & dmask[None, :]
    q_ptr = Q + b * stride_qb + t * stride_qt + hq * stride_qh + dh[None, :]
    q1 = tl.load(q_ptr, mask=mq, other=0.0)
    q2 = tl.load(q_ptr + half, mask=mq, other=0.0)
    o_ptr = Q_OUT + b * stride_ob + t * stride_ot + hq * stride_oh + dh[None, :]
    tl.store(o_ptr, q1 * c1 - q2 * s1, mask=mq)
    tl.store(o_ptr + half, q2 * c2 + q1 * s2, mask=mq)

    # k: the same rotation, written into the cache at index start + t.
    hk = tl.arange(0, BLOCK_HKV)[:, None]
    mk = (hk < HKV) & dmask[None, :]
    k_ptr = K + b * stride_kb + t * stride_kt + hk * stride_kh + dh[None, :]
    k1 = tl.load(k_ptr, mask=mk, other=0.0)
    k2 = tl.load(k_ptr + half, mask=mk, other=0.0)
    slot = start + t + 0 * hk  # [BLOCK_HKV, 1]: the cache index, shaped like the heads
    in_cache = (slot >= 0) & (slot < S)
    mk = mk & in_cache
    cache_row = b * stride_cb + hk * stride_ch + slot.to(tl.int64) * stride_cs
    kc_ptr = K_CACHE + cache_row + dh[None, :]
    tl.store(kc_ptr, k1 * c1 - k2 * s1, mask=mk)
    tl.store(kc_ptr + half, k2 * c2 + k1 * s2, mask=mk)

    # v: copied into the cache unchanged.
    d = tl.arange(0, BLOCK_D)[None, :]
    mv = (hk < HKV) & (d < D) & in_cache
    v = tl.load(V + b * stride_vb + t * stride_vt + hk * stride_vh + d, mask=mv)
    tl.store(V_CACHE + cache_row + d, v, mask=mv)


def rotary_config(n_q_heads: int, n_kv_heads: int, head_dim: int) -> dict:
    """Block sizes and warps (pure: the compile test reuses it)."""
    block_hq = triton.next_power_of_2(n_q_heads)
    block_half = triton.next_power_of_2(head_dim // 2)
    return {
        "BLOCK_HQ": block_hq, "BLOCK_HKV": triton.next_power_of_2(n_kv_heads),
        "BLOCK_HALF": block_half, "BLOCK_D": triton.next_power_of_2(head_dim),
        # At most 4 warps: with 8, ptxas (sm_80) spills 8 bytes on the Llama-3-8B shapes.
        "num_warps": min(4, max(1, block_hq * block_half // 256)),
    }


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary_write_kv_triton(q, k, v, cos, sin, positions, k_cache, v_cache, cache_start):
    """As the reference. ``cache_start`` may also be an integer tensor of 1 or B elements on q's device
    (one index for every row, or one per row), read by the kernel itself, so that a CUDA graph of the
    decode step can advance it without re-capture. A Python int is checked here (IndexError, as the
    reference); a device tensor cannot be without a host sync: the caller checks the indices before
    writing them into that tensor, and the kernel drops any write outside the cache rather than
    corrupt memory."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    S = k_cache.shape[2]
    assert D % 2 == 0, "rotary needs an even head dim"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert cos.stride() == sin.stride() and cos.stride(-1) == 1
    start_is_ptr = isinstance(cache_start, torch.Tensor)
    if not start_is_ptr:
        check_write_window(cache_start, T, S)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    q_out = torch.empty((B, T, Hq, D), dtype=q.dtype, device=q.device)
    cfg = rotary_config(Hq, Hkv, D)
    launch(_rotary_write_kv_kernel, (B * T,), q.device,
           q, k, v, cos, sin, positions, q_out, k_cache, v_cache, cache_start,
           q.stride(0), q.stride(1), q.stride(2),
           k.stride(0), k.stride(1), k.stride(2),
           v.stride(0), v.stride(1), v.stride(2),
           cos.stride(0), positions.stride(0), positions.stride(1),
           q_out.stride(0), q_out.stride(1), q_out.stride(2),
           k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
           T, Hq, Hkv, D, S, cache_start.stride(-1) if start_is_ptr and cache_start.numel() > 1 else 0,
           START_IS_PTR=start_is_ptr,
           BLOCK_HQ=cfg["BLOCK_HQ"], BLOCK_HKV=cfg["BLOCK_HKV"], BLOCK_HALF=cfg["BLOCK_HALF"],
           BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return q_out
