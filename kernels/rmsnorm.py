"""Residual add fused into Llama's RMSNorm.

Numerics follow Hugging Face ``LlamaRMSNorm``: the reciprocal RMS is computed in float32,
the normalised activations are cast back to the activation dtype, then multiplied by the weight.
"""

import torch
import triton
import triton.language as tl

from kernels.dispatch import launch, use_triton


def add_rmsnorm_reference(x, residual, weight, eps):
    """x: [..., H] sublayer output or None; residual: [..., H]; weight: [H].

    Returns (residual + x, rmsnorm(residual + x) * weight), both [..., H] in residual's dtype.
    """
    if x is not None:
        residual = residual + x
    h = residual.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return residual, weight * h.to(residual.dtype)


def add_rmsnorm(x, residual, weight, eps):
    """Dispatching entry point; see ``add_rmsnorm_reference`` for the contract."""
    if use_triton(residual):
        return add_rmsnorm_triton(x, residual, weight, eps)
    return add_rmsnorm_reference(x, residual, weight, eps)


@triton.jit
def _add_rmsnorm_kernel(
    X, R, W, R_OUT, Y,  # pointers: sublayer output, residual, weight, new residual, normed output
    stride_x, stride_r, stride_ro, stride_y,  # row strides
    H, eps,
    HAS_X: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # One program normalises one row; the whole row fits in one block.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    # Residual add in the activation dtype (as torch does), written back as the new residual.
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
    if HAS_X:
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        r = r + x
        tl.store(R_OUT + row * stride_ro + cols, r, mask=mask)
    # Reciprocal RMS in float32.
    h = r.to(tl.float32)
    rrms = tl.rsqrt(tl.sum(h * h, axis=0) / H + eps)
    # Normalised value back in the activation dtype, then times the weight.
    w = tl.load(W + cols, mask=mask, other=0.0)
    y = w * (h * rrms).to(r.dtype)
    tl.store(Y + row * stride_y + cols, y, mask=mask)


def add_rmsnorm_config(hidden: int, dtype: torch.dtype) -> dict:
    """Block size and warps for a row of ``hidden`` elements (pure: the compile test reuses it)."""
    block = triton.next_power_of_2(hidden)
    if block * torch.empty((), dtype=dtype).element_size() > 65536:
        raise ValueError(f"add_rmsnorm: hidden size {hidden} does not fit one block")
    return {"BLOCK_H": block, "num_warps": min(max(block // 256, 1), 8)}


def add_rmsnorm_triton(x, residual, weight, eps):
    H = residual.shape[-1]
    r2 = residual.reshape(-1, H)
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    if x is not None:
        x2 = x.reshape(-1, H)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        r_out = torch.empty_like(r2)
    else:
        x2, r_out = r2, r2  # unused by the kernel; the residual passes through unchanged
    y = torch.empty(r2.shape, dtype=torch.promote_types(weight.dtype, residual.dtype), device=r2.device)
    cfg = add_rmsnorm_config(H, residual.dtype)
    launch(_add_rmsnorm_kernel, (r2.shape[0],), r2.device,
           x2, r2, weight, r_out, y,
           x2.stride(0), r2.stride(0), r_out.stride(0), y.stride(0),
           H, float(eps),
           HAS_X=x is not None, BLOCK_H=cfg["BLOCK_H"], num_warps=cfg["num_warps"])
    new_residual = r_out.view(residual.shape) if x is not None else residual
    return new_residual, y.view(residual.shape)
