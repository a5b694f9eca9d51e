"""Safetensors checkpoint reading: single file or sharded index, memory-mapped, validated.

Only the tensors a caller asks for are read (``CheckpointReader.read``), so a compiled plan never
touches a dropped sublayer's weights; ``names_read`` records what was read, for tests.

A weight may be stored quantized (``python -m tools.import_gguf --keep-quant``): then the checkpoint
holds no tensor under its own name but the parts of a ``model.quant.QuantWeight``, and the file's
metadata names its type (the stored-quantized format, below). ``read_quant`` / ``read_quant_cat``
read such weights; the float ``read`` refuses them.

Stored-quantized format (safetensors only, nothing else needed to read it), for a weight ``NAME`` of
float shape [N, K] and type T with group size G:

- ``NAME.qdata``: I8 [N, K] (``q8_0``) or U8 [N, K // 2] (``q4_0``, ``q4_1``; GGUF's nibble layout,
  see ``model.quant``);
- ``NAME.qscale``: F16 [N, K // G]; ``NAME.qoffset``: F16 [N, K // G] (4-bit types only; Q4_0's is -8 d);
- the file's ``__metadata__["quant"]``: JSON ``{"version": 1, "tensors": {NAME: {"type": T, "group_size": G}}}``
  for every quantized weight of that file.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import shown
from model.errors import UserError, read_json
from model.quant import QuantWeight

# Stored quantization types (GGUF's names, lower case) -> (QuantWeight kind, group size).
QUANT_TYPES = {"q8_0": ("int8", 32), "q4_0": ("int4", 32), "q4_1": ("int4", 32)}
QUANT_META_KEY = "quant"
QUANT_META_VERSION = 1
PART_SUFFIXES = (".qdata", ".qscale", ".qoffset")


def quant_parts(name: str, w: QuantWeight) -> dict[str, torch.Tensor]:
    """The safetensors entries that store ``w`` as the weight ``name`` (the format above)."""
    parts = {name + ".qdata": w.data, name + ".qscale": w.scale}
    if w.offset is not None:
        parts[name + ".qoffset"] = w.offset
    return parts


def quant_metadata(types: dict[str, str]) -> str:
    """``__metadata__["quant"]`` for weights ``name -> type`` (a key of ``QUANT_TYPES``)."""
    return json.dumps({"version": QUANT_META_VERSION,
                       "tensors": {n: {"type": t, "group_size": QUANT_TYPES[t][1]} for n, t in types.items()}},
                      separators=(",", ":"))


def _parse_quant_metadata(raw: str | None, path: Path) -> dict[str, str]:
    """weight name -> type from a file's ``__metadata__["quant"]`` (empty when absent); UserError naming
    the file and field for anything else than the format above."""
    if raw is None:
        return {}
    where = f"{path}: metadata '{QUANT_META_KEY}'"
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise UserError(f"{where} is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(doc, dict) or doc.get("version") != QUANT_META_VERSION or not isinstance(doc.get("tensors"), dict):
        raise UserError(f"{where} must be an object with \"version\": {QUANT_META_VERSION} and a \"tensors\" object, "
                        f"got {shown(raw)}")
    types = {}
    for name, entry in doc["tensors"].items():
        t = entry.get("type") if isinstance(entry, dict) else None
        if t not in QUANT_TYPES:
            raise UserError(f"{where}: field 'tensors.{name}.type' must be one of {', '.join(QUANT_TYPES)}, "
                            f"got {shown(t)}")
        g = entry.get("group_size")
        if g != QUANT_TYPES[t][1] or isinstance(g, bool):
            raise UserError(f"{where}: field 'tensors.{name}.group_size' must be {QUANT_TYPES[t][1]} for {t}, "
                            f"got {shown(g)}")
        types[name] = t
    return types


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name; shards must be plain file names in the checkpoint
    directory (no path separators, no ``..``), so nothing outside it is ever opened."""
    raw = read_json(index)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index}: field 'weight_map' must be a non-empty object (tensor name -> shard file name), "
                        f"got {shown(weight_map)}")
    for name, shard in weight_map.items():
        plain = isinstance(shard, str) and shard not in ("", ".", "..") and "/" not in shard and "\\" not in shard
        if not plain or "\0" in shard:
            raise UserError(f"{index}: field 'weight_map.{name}' must be a plain file name inside the checkpoint "
                            f"directory (no path, no '..'), got {shown(shard)}")
    return weight_map


class CheckpointReader:
    """Maps tensor name -> safetensors file for a checkpoint directory, and reads tensors by name.

    Float weights: ``read`` / ``read_cat``. Stored-quantized weights (see the module docstring):
    ``quant_type(name)`` says whether a weight is one, ``read_quant`` / ``read_quant_cat`` read it as a
    ``model.quant.QuantWeight``. Shapes are always the float shapes the config gives ([N, K])."""

    def __init__(self, checkpoint_dir):
        self.dir = Path(checkpoint_dir)
        self.names_read: list[str] = []
        self._handles = {}
        self._quant_types: dict[Path, dict[str, str]] = {}  # file -> weight name -> type, parsed once
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            self.files = {name: self.dir / f for name, f in _weight_map(index).items()}
        elif single.is_file():
            self.files = {name: single for name in self._handle(single).keys()}
        else:
            raise UserError(f"{self.dir}: no model.safetensors or model.safetensors.index.json "
                            f"(only safetensors checkpoints are loaded, never pickles)")

    def _handle(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise UserError(f"{path}: missing (named by the checkpoint's index)")
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise UserError(f"{path}: not a readable safetensors file ({e})") from None
        return self._handles[path]

    def _view(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.files:
            raise UserError(f"{self.dir}: tensor '{name}' is missing (expected shape {list(shape)})")
        path = self.files[name]
        try:
            t = self._handle(path).get_tensor(name)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path}: cannot read tensor '{name}' ({e}); is the file truncated?") from None
        if tuple(t.shape) != tuple(shape):
            raise UserError(f"{path}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
        return t

    def mapped(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The memory-mapped tensor ``name`` (nothing copied yet), shape-checked."""
        if name not in self.files and self.quant_type(name) is not None:
            t = self.quant_type(name)
            raise UserError(f"{self.files[name + '.qdata']}: tensor '{name}' is stored quantized ({t} blocks, group "
                            f"size {QUANT_TYPES[t][1]}), not as a float tensor; read it with "
                            f"CheckpointReader.read_quant (the engine's quantized path)")
        t = self._view(name, shape)
        self.names_read.append(name)
        return t

    def read(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """Tensor ``name``, checked to have ``shape``, copied into memory we own at ``dtype`` on ``device``."""
        return self.read_cat([(name, shape)], dtype, device)

    def read_cat(self, parts: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, device) -> torch.Tensor:
        """Tensors concatenated along dim 0 (q/k/v, gate/up fusion), copied straight into one owned buffer:
        no transient copies, and no reference to the memory map survives (resident memory = loaded bytes)."""
        views = [self.mapped(name, shape) for name, shape in parts]
        for (name, _), v in zip(parts, views):
            if not v.dtype.is_floating_point:  # copying would turn integers into meaningless weights
                raise UserError(f"{self.files[name]}: tensor '{name}' is stored as {str(v.dtype).removeprefix('torch.')}; "
                                f"only floating-point weights (float32, float16, bfloat16) are loaded")
        out = _cat_into(views, dtype, device)
        # Unmap at once: mapped pages count as resident while a file stays open, which made the peak
        # at load twice the weights (1350 vs 848 MiB for SmolLM2 float32). Reopening costs a header parse.
        del views
        self._handles.clear()
        return out

    # ---- stored-quantized weights -----------------------------------------------------------
    @property
    def quantized(self) -> list[str]:
        """Names of the weights stored quantized (empty for a float checkpoint). Transformers cannot read
        these: it would load such a checkpoint with random weights in their place (and only a warning)."""
        return [n.removesuffix(".qdata") for n in self.files if n.endswith(".qdata")]

    def quant_type(self, name: str) -> str | None:
        """``'q8_0'``, ``'q4_0'`` or ``'q4_1'`` when weight ``name`` is stored quantized, None when it is
        stored as a float tensor or not at all. UserError for a half-described weight (parts without a
        metadata entry or the reverse, or both a float tensor and parts)."""
        data = name + ".qdata"
        if data not in self.files:
            for suffix in PART_SUFFIXES[1:]:
                if name + suffix in self.files:
                    raise UserError(f"{self.files[name + suffix]}: tensor '{name + suffix}' without '{data}'")
            return None
        path = self.files[data]
        if path not in self._quant_types:
            try:
                meta = self._handle(path).metadata() or {}
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"{path}: cannot read its metadata ({e})") from None
            self._quant_types[path] = _parse_quant_metadata(meta.get(QUANT_META_KEY), path)
        qtype = self._quant_types[path].get(name)
        if qtype is None:
            raise UserError(f"{path}: tensor '{data}' has no entry in the metadata '{QUANT_META_KEY}' (which names "
                            f"the quantization type of each quantized weight)")
        if name in self.files:
            raise UserError(f"{path}: weight '{name}' is stored both as a float tensor and as {qtype} blocks")
        return qtype

    def read_quant(self, name: str, shape: tuple[int, int], device) -> QuantWeight:
        """Stored-quantized weight ``name`` of float shape ``shape`` = [N, K], as a QuantWeight whose
        tensors are owned copies on ``device`` (data int8 [N, K] or uint8 [N, K // 2], scale/offset
        float16 [N, K // G])."""
        return self.read_quant_cat([(name, shape)], device)

    def read_quant_cat(self, parts: list[tuple[str, tuple[int, int]]], device) -> QuantWeight:
        """Stored-quantized weights concatenated along rows (q/k/v, gate/up fusion) into one QuantWeight
        of shape [sum N, K] on ``device``. Every part must be stored quantized with the same kind and
        group size, else UserError naming them."""
        qtypes = []
        for name, shape in parts:
            qtype = self.quant_type(name)
            if qtype is None:
                where = "a float tensor" if name in self.files else "missing"
                raise UserError(f"{self.dir}: weight '{name}' (expected shape {list(shape)}) is {where}, not stored "
                                f"quantized; read_quant reads only quantized weights")
            qtypes.append(qtype)
        kinds = {QUANT_TYPES[t] for t in qtypes}
        if len(kinds) > 1:
            listed = ", ".join(f"'{n}' is {t}" for (n, _), t in zip(parts, qtypes))
            raise UserError(f"{self.dir}: weights fused into one matrix must share kind and group size: {listed}")
        kind, group = kinds.pop()
        groups = {"data": [], "scale": [], "offset": []}
        for (name, shape), qtype in zip(parts, qtypes):
            views = self._quant_views(name, tuple(shape), qtype, kind, group)
            for part, v in views.items():
                groups[part].append(v)
            self.names_read.append(name)
        out = QuantWeight(_cat_into(groups["data"], None, device), _cat_into(groups["scale"], None, device),
                          _cat_into(groups["offset"], None, device) if kind == "int4" else None, group)
        del groups
        self._handles.clear()  # unmap, as read_cat does
        return out

    def _quant_views(self, name: str, shape: tuple, qtype: str, kind: str, group: int) -> dict[str, torch.Tensor]:
        """The mapped parts of weight ``name``, shapes and dtypes checked against ``shape`` = [N, K]."""
        path = self.files[name + ".qdata"]
        if len(shape) != 2 or shape[1] % group:
            raise UserError(f"{path}: weight '{name}' is stored as {qtype} blocks of {group} inputs, but the config "
                            f"gives it shape {list(shape)} (a matrix whose input dimension is a multiple of {group})")
        N, K = shape
        want = {"data": (name + ".qdata", (N, K) if kind == "int8" else (N, K // 2),
                         torch.int8 if kind == "int8" else torch.uint8),
                "scale": (name + ".qscale", (N, K // group), torch.float16)}
        if kind == "int4":
            want["offset"] = (name + ".qoffset", (N, K // group), torch.float16)
        elif name + ".qoffset" in self.files:
            raise UserError(f"{path}: tensor '{name}.qoffset' present, but {qtype} weights have no offset")
        views = {}
        for part, (key, part_shape, dtype) in want.items():
            v = self._view(key, part_shape)
            if v.dtype != dtype:
                raise UserError(f"{self.files[key]}: tensor '{key}' is stored as {str(v.dtype).removeprefix('torch.')}; "
                                f"{qtype} needs {str(dtype).removeprefix('torch.')}")
            views[part] = v
        return views

    def close(self):
        self._handles.clear()


def _cat_into(views: list[torch.Tensor], dtype: torch.dtype | None, device) -> torch.Tensor:
    """``views`` concatenated along dim 0 into one new buffer (at ``dtype``; None keeps theirs)."""
    rows = sum(v.shape[0] for v in views)
    out = torch.empty((rows, *views[0].shape[1:]), dtype=dtype or views[0].dtype, device=device)
    r = 0
    for v in views:
        out[r:r + v.shape[0]].copy_(v)
        r += v.shape[0]
    return out


def require_float(checkpoint_dir, who: str) -> str:
    """``checkpoint_dir`` as a string, or UserError if it stores weights quantized (GGUF blocks kept):
    transformers would load it with random weights in their place and only a warning. ``who`` names
    what needs the float checkpoint."""
    quantized = CheckpointReader(checkpoint_dir).quantized
    if quantized:
        raise UserError(f"{checkpoint_dir}: {len(quantized)} weights are stored quantized (e.g. '{quantized[0]}'); "
                        f"{who} needs a float checkpoint (import the GGUF without --keep-quant)")
    return str(checkpoint_dir)
