"""The CPU decode step, compiled with inductor (``torch.compile``).

Decode at batch 1 is a stream of matrix-vector products. On the 2-core development machine
``F.linear`` (MKL GEMV) streams SmolLM2's float32 weight shapes at about 13 GB/s, the C++ reduction
loops inductor generates for ``(x * W).sum(-1)`` at about 25 GB/s (a microbenchmark; the whole decode
step reaches 19-23 GB/s, see bench/results/latency/). So on CPU the decode step (one new token per
row, T = 1) runs these three small functions, each compiled once and reused by every layer of its
kind and every plan:

- ``attention_step``: add + RMSNorm, fused QKV, rotary, KV write by index, attention over the static
  cache under a [B, S] mask (no host sync, no slicing by the current length), output projection;
- ``mlp_step``: add + RMSNorm, fused gate/up, SwiGLU, down projection;
- ``head_step``: add + final RMSNorm, LM head.

The math is the torch reference's (``kernels/*_reference``), op for op; only the matrix-vector
products and the softmax of the attention are written out. The eager reference stays the path for
prefill, for observers (importance tools) and for parity (``runtime.load(..., compile=False)``).
"""

import torch
import torch.nn.functional as F

# Rows (batch) up to which a projection is a fused multiply-reduce; above it, a GEMM (F.linear)
# re-reads each weight row less often than B reduction passes would.
GEMV_MAX_ROWS = 1


def _linear(x, w):
    """x: [B, 1, K], w: [N, K] -> [B, 1, N]."""
    if x.shape[0] * x.shape[1] <= GEMV_MAX_ROWS:
        return (x.unsqueeze(-2) * w).sum(-1)
    return F.linear(x, w)


def _add_rmsnorm(pending, x, weight, eps):
    """As kernels.rmsnorm.add_rmsnorm_reference (Hugging Face numerics)."""
    x = x + pending
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return x, weight * h.to(x.dtype)


def _rotate(t, cos, sin):
    t1, t2 = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-t2, t1), dim=-1) * sin


def attention_step(pending, x, norm, qkv, o, k_cache, v_cache, cos, sin, index, mask,
                   heads: int, kv_heads: int, eps: float, scale: float):
    """x, pending: [B, 1, H] residual stream and the last sublayer's output (zeros at the first step);
    qkv: [(Hq + 2 Hkv) D, H]; o: [H, Hq D]; k_cache, v_cache: [B, Hkv, S, D], written at ``index``
    ([1] int64 cache index of the new token); cos, sin: [B, 1, 1, D] in x's dtype; mask: [B, S] bool,
    the keys each row attends to (its own new key included). Returns (x, attention output [B, 1, H])."""
    B = x.shape[0]
    D = k_cache.shape[-1]
    x, h = _add_rmsnorm(pending, x, norm, eps)
    q, k, v = _linear(h, qkv).split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
    q = _rotate(q.view(B, 1, heads, D), cos, sin)
    k = _rotate(k.view(B, 1, kv_heads, D), cos, sin)
    k_cache.index_copy_(2, index, k.transpose(1, 2))
    v_cache.index_copy_(2, index, v.view(B, 1, kv_heads, D).transpose(1, 2))
    # GQA without repeating K/V: the query heads of one KV head form a [group, D] block.
    scores = torch.matmul(q.view(B, kv_heads, heads // kv_heads, D), k_cache.transpose(-1, -2))
    scores = scores.float() * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(x.dtype)
    out = torch.matmul(p, v_cache)  # [B, Hkv, group, D]
    return x, _linear(out.reshape(B, 1, heads * D), o)


def mlp_step(pending, x, norm, gate_up, down, eps: float):
    """gate_up: [2 I, H]; down: [H, I]. Returns (x, MLP output [B, 1, H])."""
    x, h = _add_rmsnorm(pending, x, norm, eps)
    gate, up = _linear(h, gate_up).chunk(2, dim=-1)
    return x, _linear(F.silu(gate) * up, down)


def head_step(pending, x, norm, lm_head, eps: float):
    """Final add + RMSNorm and the LM head: logits [B, 1, V] in x's dtype."""
    _, h = _add_rmsnorm(pending, x, norm, eps)
    return _linear(h, lm_head)


_compiled = {}


def compiled(fn):
    """``fn`` compiled once per process: its compiled code is shared by every layer, plan and engine
    of the same shapes. A new model, batch size or dtype compiles a new variant (the cache length is
    dynamic, see ``Engine._decode_compiled``); a process may hold up to 64 variants per function
    (dynamo's default of 8 is too few for a test session that loads many small models)."""
    if fn not in _compiled:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=None)
    return _compiled[fn]
