"""The MLP's activation: SwiGLU on the fused gate/up projection, silu(gate) * up."""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import launch, use_triton


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [..., 2*I] = cat(gate, up) along the last dim. Returns [..., I] in the same dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate_up):
        return swiglu_triton(gate_up)
    return swiglu_reference(gate_up)


@triton.jit
def _swiglu_kernel(
    GU, OUT,  # pointers: [rows, 2I] input, [rows, I] output
    stride_gu, stride_out,  # row strides
    I,
    BLOCK: tl.constexpr,
):
    # Program (row, j) handles columns j*BLOCK .. j*BLOCK+BLOCK-1 of one row.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    # gate is the first half of the row, up the second.
    g = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0)
    u = tl.load(GU + row * stride_gu + I + cols, mask=mask, other=0.0)
    # silu in float32, rounded to the activation dtype, then times up (as torch does).
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(OUT + row * stride_out + cols, s * u, mask=mask)


def swiglu_config(inter: int) -> dict:
    """Block size and warps for an intermediate size ``inter`` (pure: the compile test reuses it)."""
    block = min(1024, max(16, triton.next_power_of_2(inter)))
    return {"BLOCK": block, "num_warps": 4 if block >= 512 else 1}


def swiglu_triton(gate_up):
    I2 = gate_up.shape[-1]
    assert I2 % 2 == 0, "gate_up's last dimension must be even"
    I = I2 // 2
    gu = gate_up.reshape(-1, I2)
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    out = torch.empty((gu.shape[0], I), dtype=gate_up.dtype, device=gate_up.device)
    cfg = swiglu_config(I)
    grid = (gu.shape[0], triton.cdiv(I, cfg["BLOCK"]))
    launch(_swiglu_kernel, grid, gu.device, gu, out, gu.stride(0), out.stride(0), I,
           BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return out.view(*gate_up.shape[:-1], I)
