"""Safetensors checkpoint reading: single file or sharded index, memory-mapped, validated.

Only the tensors a caller asks for are read (``CheckpointReader.read``), so a compiled plan never
touches a dropped sublayer's weights; ``names_read`` records what was read, for tests.
"""

from pathlib import Path

import torch
from safetensors import safe_open

from model.config import shown
from model.errors import UserError, read_json


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
    """Maps tensor name -> safetensors file for a checkpoint directory, and reads tensors by name."""

    def __init__(self, checkpoint_dir):
        self.dir = Path(checkpoint_dir)
        self.names_read: list[str] = []
        self._handles = {}
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

    def mapped(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The memory-mapped tensor ``name`` (nothing copied yet), shape-checked."""
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
        rows = sum(v.shape[0] for v in views)
        out = torch.empty((rows, *views[0].shape[1:]), dtype=dtype, device=device)
        r = 0
        for v in views:
            out[r:r + v.shape[0]].copy_(v)
            r += v.shape[0]
        # Unmap at once: mapped pages count as resident while a file stays open, which made the peak
        # at load twice the weights (1350 vs 848 MiB for SmolLM2 float32). Reopening costs a header parse.
        del views
        self._handles.clear()
        return out

    def close(self):
        self._handles.clear()
