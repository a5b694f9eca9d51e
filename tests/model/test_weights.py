"""Safetensors reading: single file, sharded index, only what is asked, clear errors."""

import json
import re

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


# ----------------------------------------------------------------------------- stored-quantized weights


def _quant_checkpoint(path, weights: dict, types: dict, *, meta=None, extra=None):
    """A checkpoint directory holding ``weights`` (name -> QuantWeight) as parts of ``types`` (name -> type)."""
    from model.weights import QUANT_META_KEY, quant_metadata, quant_parts

    path.mkdir(exist_ok=True)
    tensors = {"model.norm.weight": torch.ones(64)} | (extra or {})
    for name, w in weights.items():
        tensors |= quant_parts(name, w)
    save_file(tensors, path / "model.safetensors", metadata={QUANT_META_KEY: meta if meta is not None else quant_metadata(types)})
    return path


Q = "model.layers.0.self_attn.q_proj.weight"
K_ = "model.layers.0.self_attn.k_proj.weight"


@pytest.fixture
def quant_weights():
    from model.quant import quantize

    torch.manual_seed(0)
    return {Q: quantize(torch.randn(64, 96), "int4", 32), K_: quantize(torch.randn(32, 96), "int4", 32),
            "model.layers.0.mlp.up_proj.weight": quantize(torch.randn(48, 96), "int8", 32)}


TYPES = {Q: "q4_1", K_: "q4_0", "model.layers.0.mlp.up_proj.weight": "q8_0"}


def test_require_float_refuses_stored_quantized(tmp_path, quant_weights):
    """Transformers would load a kept-blocks checkpoint with random weights: the tools that hand a
    checkpoint to it (HF reference, healing, the HF latency rows) refuse it, naming the directory."""
    from model.weights import require_float

    path = _quant_checkpoint(tmp_path, quant_weights, TYPES)
    assert require_float(STORIES, "the test") == str(STORIES)
    with pytest.raises(UserError, match=rf"{tmp_path}: 3 weights are stored quantized .*the test needs a float checkpoint"):
        require_float(path, "the test")


def test_quant_read_and_cat(tmp_path, quant_weights):
    r = CheckpointReader(_quant_checkpoint(tmp_path, quant_weights, TYPES))
    assert [r.quant_type(n) for n in TYPES] == list(TYPES.values()) and r.quant_type("model.norm.weight") is None
    assert sorted(r.quantized) == sorted(TYPES) and CheckpointReader(STORIES).quantized == []
    up = r.read_quant("model.layers.0.mlp.up_proj.weight", (48, 96), "cpu")
    assert up.offset is None and up.group_size == 32 and torch.equal(up.data, quant_weights["model.layers.0.mlp.up_proj.weight"].data)
    qk = r.read_quant_cat([(Q, (64, 96)), (K_, (32, 96))], "cpu")  # q4_1 and q4_0: both int4 group 32
    for part in ("data", "scale", "offset"):
        assert torch.equal(getattr(qk, part), torch.cat([getattr(quant_weights[n], part) for n in (Q, K_)])), part
    assert qk.data.data_ptr() != quant_weights[Q].data.data_ptr() and qk.data.is_contiguous()
    assert r.names_read == ["model.layers.0.mlp.up_proj.weight", Q, K_]


def test_quant_refused_on_the_float_path_and_the_reverse(tmp_path, quant_weights):
    r = CheckpointReader(_quant_checkpoint(tmp_path, quant_weights, TYPES))
    with pytest.raises(UserError, match=rf"model.safetensors: tensor '{Q}' is stored quantized \(q4_1 blocks, group size "
                                        r"32\), not as a float tensor; read it with CheckpointReader.read_quant"):
        r.read_cat([(Q, (64, 96)), (K_, (32, 96))], torch.float32, "cpu")
    with pytest.raises(UserError, match=r"weight 'model.norm.weight' \(expected shape \[64\]\) is a float tensor, not stored quantized"):
        r.read_quant("model.norm.weight", (64,), "cpu")
    with pytest.raises(UserError, match=r"weight 'nope' \(expected shape \[2, 32\]\) is missing"):
        r.read_quant("nope", (2, 32), "cpu")
    with pytest.raises(UserError, match=rf"must share kind and group size: '{Q}' is q4_1, 'model.layers.0.mlp.up_proj.weight' is q8_0"):
        r.read_quant_cat([(Q, (64, 96)), ("model.layers.0.mlp.up_proj.weight", (48, 96))], "cpu")


def test_quant_shapes_checked_against_the_config(tmp_path, quant_weights):
    r = CheckpointReader(_quant_checkpoint(tmp_path, quant_weights, TYPES))
    with pytest.raises(UserError, match=rf"tensor '{Q}.qdata' has shape \[64, 48\], expected \[64, 64\]"):
        r.read_quant(Q, (64, 128), "cpu")
    with pytest.raises(UserError, match=rf"tensor '{Q}.qdata' has shape \[64, 48\], expected \[65, 48\]"):
        r.read_quant(Q, (65, 96), "cpu")
    with pytest.raises(UserError, match=r"stored as q4_1 blocks of 32 inputs, but the config gives it shape \[64, 100\]"):
        r.read_quant(Q, (64, 100), "cpu")


@pytest.mark.parametrize("part, dtype, words", [
    ("qdata", torch.int8, "'{n}.qdata' is stored as int8; q4_1 needs uint8"),
    ("qscale", torch.float32, "'{n}.qscale' is stored as float32; q4_1 needs float16"),
    ("qoffset", torch.bfloat16, "'{n}.qoffset' is stored as bfloat16; q4_1 needs float16"),
])
def test_quant_part_dtypes(tmp_path, quant_weights, part, dtype, words):
    w = quant_weights[Q]
    field = {"qdata": "data", "qscale": "scale", "qoffset": "offset"}[part]
    bad = w._replace(**{field: getattr(w, field).view(dtype) if dtype.itemsize == getattr(w, field).element_size()
                        else getattr(w, field).to(dtype)})
    r = CheckpointReader(_quant_checkpoint(tmp_path, {Q: bad}, {Q: "q4_1"}))
    with pytest.raises(UserError, match=re.escape(words.format(n=Q))):
        r.read_quant(Q, (64, 96), "cpu")


@pytest.mark.parametrize("meta, words", [
    ("{not json", "metadata 'quant' is not valid JSON"),
    ('{"version": 2, "tensors": {}}', 'must be an object with "version": 1 and a "tensors" object'),
    (json.dumps({"version": 1, "tensors": {Q: {"type": "q4_k", "group_size": 32}}}),
     f"field 'tensors.{Q}.type' must be one of q8_0, q4_0, q4_1, got 'q4_k'"),
    (json.dumps({"version": 1, "tensors": {Q: {"type": "q4_1", "group_size": 64}}}),
     f"field 'tensors.{Q}.group_size' must be 32 for q4_1, got 64"),
    (json.dumps({"version": 1, "tensors": {}}), f"tensor '{Q}.qdata' has no entry in the metadata 'quant'"),
])
def test_quant_metadata_checked(tmp_path, quant_weights, meta, words):
    r = CheckpointReader(_quant_checkpoint(tmp_path, {Q: quant_weights[Q]}, {}, meta=meta))
    with pytest.raises(UserError, match=re.escape(words)):
        r.read_quant(Q, (64, 96), "cpu")


def test_quant_half_described_weights(tmp_path, quant_weights):
    w = quant_weights[Q]
    r = CheckpointReader(_quant_checkpoint(tmp_path / "a", {Q: w._replace(offset=None)}, {Q: "q4_1"}))
    with pytest.raises(UserError, match=rf"tensor '{Q}.qoffset' is missing"):
        r.read_quant(Q, (64, 96), "cpu")
    r = CheckpointReader(_quant_checkpoint(tmp_path / "b", {Q: w}, {Q: "q4_1"}, extra={Q: torch.zeros(64, 96)}))
    with pytest.raises(UserError, match=rf"weight '{Q}' is stored both as a float tensor and as q4_1 blocks"):
        r.read_quant(Q, (64, 96), "cpu")
    up = quant_weights["model.layers.0.mlp.up_proj.weight"]
    name = "model.layers.0.mlp.up_proj.weight"
    r = CheckpointReader(_quant_checkpoint(tmp_path / "c", {name: up}, {name: "q8_0"}, extra={name + ".qoffset": up.scale.clone()}))
    with pytest.raises(UserError, match=r"'model.layers.0.mlp.up_proj.weight.qoffset' present, but q8_0 weights have no offset"):
        r.read_quant(name, (48, 96), "cpu")
    r = CheckpointReader(_quant_checkpoint(tmp_path / "d", {}, {}, extra={name + ".qscale": up.scale}))
    with pytest.raises(UserError, match=r"tensor 'model.layers.0.mlp.up_proj.weight.qscale' without 'model.layers.0.mlp.up_proj.weight.qdata'"):
        r.read(name, (48, 96), torch.float32, "cpu")


def test_quant_truncated_file(tmp_path, quant_weights):
    _quant_checkpoint(tmp_path, quant_weights, TYPES)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(UserError, match="model.safetensors"):
        CheckpointReader(tmp_path).read_quant(Q, (64, 96), "cpu")
