"""Weight-only quantized matrices: one format for our int8 / int4 and GGUF's Q8_0 / Q4_0 / Q4_1 blocks.

A ``QuantWeight`` holds an [N, K] weight (N output rows, K inputs) in groups of ``group_size`` inputs,
each group with its own float16 scale (and, for 4-bit, a float16 offset), so that GGUF blocks map
onto it without conversion (Q8_0: int8, group 32; Q4_1: int4, group 32, offset m; Q4_0: int4, group
32, offset -8 d) and our load-time quantization (int8 per output channel = one group of K; int4
groups of 32/64/128 with scale and offset) runs on the same kernels.

- ``int8``: ``data`` int8 [N, K]; w[n, k] = data[n, k] * scale[n, k // G].
- ``int4``: ``data`` uint8 [N, K // 2]; each 32 inputs of a row are packed in 16 bytes as GGUF packs
  them: byte j of a block holds input j in its low nibble and input j + 16 in its high nibble (this
  layout is what lets a compiled CPU loop vectorise the unpacking); w = nibble * scale + offset.
"""

from typing import NamedTuple

import torch

from model.errors import UserError

KINDS = ("int8", "int4")
BLOCK = 32  # inputs per packed 4-bit block (GGUF's QK4_0 / QK4_1 / QK8_0)


class QuantWeight(NamedTuple):
    """data: int8 [N, K] or uint8 [N, K // 2]; scale, offset: float16 [N, K // group_size] (offset None
    for int8); group_size: inputs per group (a multiple of 32 for int4)."""
    data: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    group_size: int

    @property
    def kind(self) -> str:
        return "int8" if self.data.dtype == torch.int8 else "int4"

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.scale.shape[1] * self.group_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self if isinstance(t, torch.Tensor))


def unpack_int4(data: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] in GGUF's block layout -> the nibbles as uint8 [N, K], in input order."""
    N = data.shape[0]
    blocks = data.view(N, -1, BLOCK // 2)  # [N, K / 32, 16]
    return torch.cat([blocks & 0xF, blocks >> 4], dim=-1).view(N, -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Nibbles uint8 [N, K] (values 0..15) -> uint8 [N, K // 2] in GGUF's block layout."""
    N = q.shape[0]
    blocks = q.view(N, -1, BLOCK)
    return (blocks[..., :BLOCK // 2] | (blocks[..., BLOCK // 2:] << 4)).reshape(N, -1).contiguous()


def dequantize(w: QuantWeight, dtype=torch.float32) -> torch.Tensor:
    """The reference: the [N, K] float weight ``w`` stands for, at ``dtype`` (computed in float32)."""
    N, K = w.shape
    q = (w.data if w.kind == "int8" else unpack_int4(w.data)).float().view(N, -1, w.group_size)
    out = q * w.scale.float()[..., None]
    if w.offset is not None:
        out = out + w.offset.float()[..., None]
    return out.view(N, K).to(dtype)


def check_group_size(kind: str, group_size: int, K: int, what: str):
    """UserError unless ``group_size`` suits ``kind`` and divides the input dimension ``K`` of ``what``."""
    if kind not in KINDS:
        raise UserError(f"--quant: expected one of {', '.join(KINDS)}; got {kind!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise UserError(f"--group-size: expected a positive integer, got {group_size!r}")
    if kind == "int4" and group_size % BLOCK:
        raise UserError(f"--group-size: int4 groups are whole blocks of {BLOCK} inputs (32, 64, 128, ...); got {group_size}")
    if K % group_size:
        raise UserError(f"--group-size: {group_size} does not divide the input dimension {K} of {what}")


def quantize(w: torch.Tensor, kind: str, group_size: int | None = None, what: str = "a weight") -> QuantWeight:
    """Quantize a float [N, K] weight. int8: symmetric (scale = max |w| / 127), one group per output
    row unless ``group_size`` is given; int4: asymmetric per group (scale = (max - min) / 15, offset =
    min, as GGUF's Q4_1). Rounds against the float16 scale that is stored, so that dequantizing
    reproduces the nearest representable weights."""
    N, K = w.shape
    group_size = K if kind == "int8" and group_size is None else group_size
    check_group_size(kind, group_size, K, what)
    g = w.float().view(N, K // group_size, group_size)
    if kind == "int8":
        scale = (g.abs().amax(-1) / 127).half()
        s = scale.float().clamp_min(torch.finfo(torch.float16).tiny)[..., None]
        data = (g / s).round().clamp(-127, 127).to(torch.int8).view(N, K)
        return QuantWeight(data, scale, None, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale, offset = ((hi - lo) / 15).half(), lo.half()
    s = scale.float().clamp_min(torch.finfo(torch.float16).tiny)[..., None]
    q = ((g - offset.float()[..., None]) / s).round().clamp(0, 15).to(torch.uint8).view(N, K)
    return QuantWeight(pack_int4(q), scale, offset, group_size)
