"""The decode step, written once: one new token per row through the attention, MLP and head steps.

Every device runs these functions (gpt-fast's ``decode_one_token``): on CPU each is compiled once with
inductor (``runtime.fast_decode.compiled_steps``) and shared by every layer of its kind, every plan and
every engine; on a GPU the whole step, these functions over every layer, is captured as one CUDA graph
(``runtime.fast_decode.DecodeGraph``); ``compile=False`` runs them as they are. They are built from
``kernels.*`` ops (Triton on CUDA tensors, the torch references on CPU) and free of host syncs and
static in shape, so that a compiler or a graph can take them whole:

- the KV cache is written by index: row b's new key and value go to cache index ``index[b]``;
- attention runs over the cache it is given under a mask (keys ``kv_start[b] .. index[b]``): on CPU
  the caller passes the cache cut to the batch's longest used length (a dynamic dimension, one
  compiled step for every length); the Triton kernel reads the bounds from device memory and loads
  only the keys inside them.

``project(x, w)`` is the one device-specific part: ``linear`` by default; the compiled CPU step
passes ``multiply_reduce``, which inductor turns into a fused loop that streams weights about twice
as fast as a GEMV. A quantized projection plugs in here, and nothing else of the step changes: ``w``
may be a ``model.quant.QuantWeight`` (``runtime.load(..., quant=...)``), which ``linear`` runs with the
Triton kernel on CUDA (``kernels.quant_matmul``) and as dequantize-then-matmul elsewhere (the
reference), and ``multiply_reduce`` for one row with the C++ kernel ``kernels.quant_gemv_cpu`` (or,
where it cannot be built, inductor's fused dequantize-multiply-reduce loop).
"""

import torch
import torch.nn.functional as F

import kernels
from kernels import quant_gemv_cpu
from kernels.dispatch import use_triton
from model.quant import QuantWeight, dequantize, take_rows


def linear(x, w):
    """x: [..., K] @ w [N, K].T -> [..., N] in x's dtype. A QuantWeight runs ``kernels.quant_matmul`` on
    CUDA tensors, and elsewhere the reference: ``w`` dequantized to x's dtype, multiplied in float32
    (prefill and batches dequantize one projection at a time)."""
    if not isinstance(w, QuantWeight):
        return F.linear(x, w)
    return kernels.quant_matmul(x, w)


def embedding(tokens, table, dtype):
    """tokens: [B, T] -> [B, T, H] at ``dtype``; a quantized table dequantizes only the rows looked up."""
    if not isinstance(table, QuantWeight):
        return F.embedding(tokens, table)
    return dequantize(take_rows(table, tokens), dtype).view(*tokens.shape, -1)


def quant_multiply_reduce(x, w: QuantWeight):
    """x: [K] float, w: [N, K] quantized -> [N] float32: one fused loop over the quantized bytes (no
    float copy of the weight), the group scale applied per element so that the whole row is one
    reduction. int4 reads GGUF's nibble layout as two 16-wide halves of each 32-input block, which
    inductor vectorises; the offset term is sum_g offset[n, g] * (sum of x over group g)."""
    N, K = w.shape
    G = w.group_size
    x = x.float()
    scale = w.scale.float()
    if w.kind == "int8":
        if G == K:  # per channel: the scale after the reduction (one multiply per weight element less)
            return (x * w.data).sum(-1) * scale[:, 0]
        xs = x.view(K // G, G)
        return (xs * w.data.view(N, K // G, G) * scale[..., None]).sum((-1, -2))
    d = w.data.view(N, K // G, G // 32, 16)
    xs = x.view(K // G, G // 32, 2, 16)
    s = scale[..., None, None]  # applied to each 16-wide partial product (1.4x faster than to each half's x)
    y = (s * ((d & 15).float() * xs[..., 0, :] + (d >> 4).float() * xs[..., 1, :])).sum((-1, -2, -3))
    if w.offset is not None:
        y = y + (w.offset.float() * xs.sum((-1, -2, -3))).sum(-1)
    return y


def _stored(x):
    """x itself; under inductor, computed into a buffer once. Inductor inlines a cheap producer (the
    RMSNorm before a projection) into its consumer's loop, i.e. recomputes it for every weight element
    of a multiply-reduce: 2 loads and 2 multiplies more per element, 2-3x the time of an int8
    projection. Eagerly (not compiled) nothing is stored."""
    if not torch.compiler.is_compiling():
        return x
    from torch._inductor import inductor_prims

    return inductor_prims.force_stride_order(x, x.stride())


def multiply_reduce(x, w):
    """x: [B, 1, K], w: [N, K] -> [B, 1, N]: one row as a multiply-reduce (inductor's fused loop); more
    rows as a GEMM, which re-reads each weight row less often than B reduction passes would. A
    QuantWeight: one row with ``kernels.quant_gemv_cpu`` where it is built (else the fused loop
    ``quant_multiply_reduce``), ``linear`` (dequantize, then a GEMM) for more."""
    if x.shape[0] * x.shape[1] == 1:
        x = _stored(x)
        if isinstance(w, QuantWeight):
            if x.device.type == "cpu" and quant_gemv_cpu.available():
                y = quant_gemv_cpu.quant_gemv(x.reshape(-1).float().contiguous(), w)
            else:
                y = quant_multiply_reduce(x.reshape(-1), w)
            return y.to(x.dtype).view(1, 1, -1)
        return (x.unsqueeze(-2) * w).sum(-1)
    return linear(x, w)


def decode_attention(q, k_cache, v_cache, kv_start, kv_end, scale: float):
    """q: [B, Hq, D]; k_cache, v_cache: [B, Hkv, S, D]; row b attends to keys kv_start[b] <= k < kv_end[b]
    (never none: its own new key is among them). Returns [B, Hq, D]. On CPU: a masked softmax over
    the S keys given, GQA without repeating K/V (a KV head's query heads form a [group, D] block),
    both products as multiply-reduce (a matmul would copy the cut, strided cache first in bfloat16)."""
    if use_triton(q):
        return kernels.decode_attention(q, k_cache, v_cache, kv_start, kv_end, scale)
    B, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    keys = torch.arange(S, device=q.device)[None]
    mask = (keys >= kv_start[:, None]) & (keys < kv_end[:, None])  # [B, S]
    scores = (q.view(B, Hkv, Hq // Hkv, 1, D) * k_cache[:, :, None]).sum(-1).float() * scale  # [B, Hkv, G, S]
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(q.dtype)
    return (p[..., None] * v_cache[:, :, None]).sum(-2).view(B, Hq, D)


def attention_step(pending, x, norm, qkv, o, k_cache, v_cache, cos, sin, positions, index, kv_start,
                   heads: int, kv_heads: int, eps: float, scale: float, project=linear, prefill_start=None,
                   length=None):
    """pending, x: [B, T, H] the last sublayer's output (zeros or None before the first) and the residual
    stream; norm: [H]; qkv: [(Hq + 2 Hkv) D, H]; o: [H, Hq D]; k_cache, v_cache: [B, Hkv, S, D];
    cos, sin: [P, D] tables; positions: [B, T] rotary positions; index: [B] int64 cache index of each
    row's first token; kv_start: [B] int32 first valid cache index (left padding). Decode (T = 1):
    attention over the cache under a mask. ``prefill_start`` (an int, eager only): the chunk starts at
    that cache index in every row and attends causally (``kernels.prefill_attention``). ``length``
    (decode): attend over the first ``length`` cache positions only, the new K/V written into the
    whole cache (compiled, a write through a cut view would copy the cut twice per step).
    Returns (x, attention output [B, T, H])."""
    B, T = x.shape[:2]
    D = k_cache.shape[-1]
    x, h = kernels.add_rmsnorm(pending, x, norm, eps)
    q, k, v = project(h, qkv).split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
    # rotary + K/V written at index[b] + t, per row (Triton reads the [B] index from device memory)
    q = kernels.rotary_write_kv(q.view(B, T, heads, D), k.view(B, T, kv_heads, D), v.view(B, T, kv_heads, D),
                                cos, sin, positions, k_cache, v_cache, index)
    if prefill_start is None:
        if length is not None:
            k_cache, v_cache = k_cache[:, :, :length], v_cache[:, :, :length]
        # the rotated query stored once (inlined, it would be recomputed for every key it meets)
        out = decode_attention(_stored(q[:, 0]), k_cache, v_cache, kv_start, (index + 1).to(kv_start.dtype), scale)
    else:
        out = kernels.prefill_attention(q, k_cache, v_cache, prefill_start, kv_start, scale)
    return x, project(out.reshape(B, T, heads * D), o)


def mlp_step(pending, x, norm, gate_up, down, eps: float, project=linear):
    """gate_up: [2 I, H] (gate and up fused); down: [H, I]. Returns (x, MLP output [B, T, H])."""
    x, h = kernels.add_rmsnorm(pending, x, norm, eps)
    return x, project(kernels.swiglu(project(h, gate_up)), down)


def head_step(pending, x, norm, lm_head, eps: float, project=linear):
    """Final add + RMSNorm and the LM head: logits [B, T, V] in x's dtype."""
    _, h = kernels.add_rmsnorm(pending, x, norm, eps)
    return project(h, lm_head)
