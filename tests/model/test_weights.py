"""Safetensors reading: single file, sharded index, only what is asked, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.errors import UserError
from model.weights import CheckpointReader
from bench.hf_reference import STORIES


def test_reads_cast_and_records():
    r = CheckpointReader(STORIES)
    t = r.read("model.norm.weight", (64,), torch.bfloat16, "cpu")
    assert t.dtype == torch.bfloat16 and r.names_read == ["model.norm.weight"]


def test_sharded_index_equals_single(tmp_path):
    tensors = load_file(STORIES / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, tmp_path / "a.safetensors")
    save_file({n: tensors[n] for n in names[half:]}, tmp_path / "b.safetensors")
    index = {n: ("a.safetensors" if i < half else "b.safetensors") for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    r = CheckpointReader(tmp_path)
    for n in (names[0], names[-1]):
        assert torch.equal(r.read(n, tensors[n].shape, torch.float32, "cpu"), tensors[n])


def test_missing_and_misshaped_tensor():
    r = CheckpointReader(STORIES)
    with pytest.raises(UserError, match=r"'model.layers.9.mlp.up_proj.weight' is missing \(expected shape \[172, 64\]\)"):
        r.read("model.layers.9.mlp.up_proj.weight", (172, 64), torch.float32, "cpu")
    with pytest.raises(UserError, match=r"has shape \[64\], expected \[65\]"):
        r.read("model.norm.weight", (65,), torch.float32, "cpu")


def test_truncated_and_absent_files(tmp_path):
    data = (STORIES / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors"):
        r = CheckpointReader(tmp_path)
        for name in r.files:  # some formats only fail when the tensor is read
            r.read(name, load_file(STORIES / "model.safetensors")[name].shape, torch.float32, "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no model.safetensors"):
        CheckpointReader(empty)
    (empty / "pytorch_model.bin").write_bytes(b"\x80")  # never unpickled
    with pytest.raises(UserError, match="never pickles"):
        CheckpointReader(empty)


def test_integer_weights_refused(tmp_path):
    save_file({"model.norm.weight": torch.arange(64, dtype=torch.int32)}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"model.safetensors: tensor 'model.norm.weight' is stored as int32; only floating"):
        CheckpointReader(tmp_path).read("model.norm.weight", (64,), torch.float32, "cpu")
