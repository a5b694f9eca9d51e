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

from dataclasses import dataclass, field
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


def quant_nbytes(kind: str, group_size: int, shape: tuple[int, int]) -> int:
    """Bytes of a QuantWeight of float shape [N, K] (data, float16 scales, and offsets for int4)."""
    N, K = shape
    groups = N * (K // group_size)
    return N * K + 2 * groups if kind == "int8" else N * K // 2 + 4 * groups


def take_rows(w: QuantWeight, index: torch.Tensor) -> QuantWeight:
    """Rows ``index`` (any shape of int64) of ``w`` as a QuantWeight of [index.numel(), K] (an embedding
    lookup: ``dequantize(take_rows(w, ids))`` is the float table's rows, without expanding the table)."""
    i = index.reshape(-1)
    return QuantWeight(w.data[i], w.scale[i], None if w.offset is None else w.offset[i], w.group_size)


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


# The projections a load-time scheme quantizes (fused q/k/v, o, fused gate/up, down) and, with ``head``,
# the embedding table and LM head: checkpoint tensor names ending so.
PROJECTION_SUFFIX = "_proj.weight"
HEAD_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True, eq=False)
class QuantScheme:
    """How a loaded model's weights are stored: ``kind`` int8/int4 quantized at load time (None: not
    at load) in groups of ``group_size`` inputs (int8 None: one group per output row), the embedding
    and LM head too with ``head``; ``stored``: weight name -> (kind, group size, GGUF type) of the
    weights a checkpoint already stores quantized (``model.weights``), run as they are."""
    kind: str | None = None
    group_size: int | None = None
    head: bool = False
    stored: dict = field(default_factory=dict)

    def layout(self, name: str, shape: tuple[int, ...]) -> tuple[str, int] | None:
        """(kind, group size) of weight ``name`` of float shape ``shape``, or None if it stays float."""
        if name in self.stored:
            return self.stored[name][:2]
        if self.kind is None or len(shape) != 2 or not (name.endswith(PROJECTION_SUFFIX) or
                                                         (self.head and name in HEAD_NAMES)):
            return None
        return self.kind, self.group_size or shape[1]

    def nbytes(self, name: str, shape: tuple[int, ...], elem: int) -> int:
        """Bytes weight ``name`` takes: quantized, or ``elem`` bytes per element if it stays float."""
        layout = self.layout(name, shape)
        if layout is None:
            n = 1
            for d in shape:
                n *= d
            return n * elem
        return quant_nbytes(layout[0], layout[1], shape)

    def describe(self) -> str:
        """One line, e.g. ``int4, groups of 64 inputs (float16 scale + offset); embedding and LM head in
        the compute dtype``."""
        if self.stored:
            counts = {}
            for _, _, t in self.stored.values():
                counts[t] = counts.get(t, 0) + 1
            return "stored blocks as in the checkpoint: " + ", ".join(f"{n} weight{'s' * (n != 1)} {t}" for t, n in counts.items())
        if self.kind == "int8":
            what = "int8, symmetric, " + (f"groups of {self.group_size} inputs" if self.group_size
                                          else "one float16 scale per output channel")
        else:
            what = f"int4, groups of {self.group_size} inputs (float16 scale + offset)"
        return what + ("; embedding and LM head quantized too" if self.head
                       else "; embedding and LM head in the compute dtype")


def resolve_scheme(quant, group_size=None, quant_head=False) -> QuantScheme | None:
    """The scheme for ``runtime.load``'s ``quant`` (None, "none", "int8", "int4"), ``group_size`` (int4:
    default 64; int8: default one group per output channel) and ``quant_head``; UserError naming the
    flag for anything else. None when nothing is quantized."""
    if quant in (None, "none"):
        if group_size is not None:
            raise UserError(f"--group-size: only with --quant int8 or int4; got --group-size {group_size!r} without --quant")
        if quant_head:
            raise UserError("--quant-head: only with --quant int8 or int4 (it quantizes the embedding and LM head too)")
        return None
    if quant not in KINDS:
        raise UserError(f"--quant: expected none, {' or '.join(KINDS)}; got {quant!r}")
    if not isinstance(quant_head, bool):
        raise UserError(f"--quant-head: expected true or false, got {quant_head!r}")
    if group_size is None and quant == "int4":
        group_size = 64
    if group_size is not None:
        check_group_size(quant, group_size, group_size, "--group-size")
    return QuantScheme(quant, group_size, quant_head)


def parse_label(label: str, flag: str = "--quants") -> tuple[str | None, int | None]:
    """A scheme label as benchmarks list them -> ``runtime.load``'s (quant, group_size): ``none``,
    ``int8`` (per output channel), ``int4`` (groups of 64), or ``KIND-gN`` (groups of N), e.g. ``int4-g32``."""
    kind, _, group = label.partition("-g")
    if kind == "none" and not group:
        return None, None
    if kind not in KINDS or (group and not group.isdigit()) or label.endswith("-g"):
        raise UserError(f"{flag}: expected entries none, int8, int4 or KIND-gN (e.g. int4-g32); got {label!r}")
    return kind, int(group) if group else None
