"""model.quant: the one weight-only format (int8 / int4 in GGUF's nibble layout), its quantizers, byte
counts, row lookup and the load-time scheme's validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.errors import UserError
from model.quant import (QuantScheme, QuantWeight, dequantize, pack_int4, quant_nbytes, quantize, resolve_scheme,
                         take_rows, unpack_int4)


def weight(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) * 0.05 + 0.01


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 4), st.randoms(use_true_random=False))
def test_pack_unpack_round_trip(N, blocks, rnd):
    q = torch.tensor([[rnd.randrange(16) for _ in range(32 * blocks)] for _ in range(N)], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (N, 16 * blocks) and torch.equal(unpack_int4(packed), q)


def test_int4_nibble_layout_is_ggufs():
    """Byte j of a 32-input block: input j in the low nibble, input j + 16 in the high one."""
    q = torch.arange(64, dtype=torch.uint8).remainder(16).view(1, 64)
    q[0, 16:32] = 15 - q[0, 16:32]
    packed = pack_int4(q)
    for b in range(2):
        for j in range(16):
            byte = int(packed[0, 16 * b + j])
            assert byte & 0xF == int(q[0, 32 * b + j]) and byte >> 4 == int(q[0, 32 * b + j + 16])


@pytest.mark.parametrize("kind,group", [("int8", None), ("int8", 32), ("int4", 32), ("int4", 64)])
def test_quantize_error_is_at_most_half_a_step(kind, group):
    w = weight(24, 128)
    q = quantize(w, kind, group)
    assert q.kind == kind and q.shape == (24, 128) and q.group_size == (group or 128)
    G = q.group_size
    step = q.scale.float().repeat_interleave(G, dim=1)
    err = (dequantize(q) - w).abs()
    # half a quantization step, plus float16 rounding of the offset (int4) and float32 rounding
    slack = 0 if kind == "int8" else q.offset.float().abs().repeat_interleave(G, dim=1) * 2 ** -11
    assert (err <= step / 2 * (1 + 1e-5) + slack + 1e-7).all()
    assert dequantize(q, torch.bfloat16).dtype == torch.bfloat16


def test_nbytes_formula_matches_the_tensors():
    for kind, group in [("int8", None), ("int8", 32), ("int4", 32), ("int4", 128)]:
        q = quantize(weight(40, 256), kind, group)
        assert quant_nbytes(kind, q.group_size, (40, 256)) == q.nbytes
    assert quant_nbytes("int8", 256, (40, 256)) == 40 * 256 + 40 * 2
    assert quant_nbytes("int4", 32, (40, 256)) == 40 * 128 + 40 * 8 * 4


def test_take_rows_dequantizes_like_the_table():
    for kind, group in [("int8", None), ("int4", 32)]:
        q = quantize(weight(50, 64), kind, group)
        ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
        assert torch.equal(dequantize(take_rows(q, ids)), dequantize(q)[ids.reshape(-1)])


def test_scheme_layout_and_bytes():
    s = resolve_scheme("int4")
    assert s.group_size == 64 and not s.head
    proj, shape = "model.layers.0.mlp.down_proj.weight", (64, 128)
    assert s.layout(proj, shape) == ("int4", 64)
    assert s.layout("model.layers.0.input_layernorm.weight", (128,)) is None
    assert s.layout("model.embed_tokens.weight", (512, 128)) is None
    assert s.nbytes("model.embed_tokens.weight", (512, 128), 4) == 512 * 128 * 4
    assert s.nbytes(proj, shape, 4) == quant_nbytes("int4", 64, shape)
    h = resolve_scheme("int8", None, True)
    assert h.layout("lm_head.weight", (512, 128)) == ("int8", 128)
    assert h.layout("model.embed_tokens.weight", (512, 128)) == ("int8", 128)
    stored = QuantScheme(stored={proj: ("int4", 32, "q4_1")})
    assert stored.layout(proj, shape) == ("int4", 32) and stored.layout("model.layers.0.mlp.up_proj.weight", shape) is None
    assert "q4_1" in stored.describe() and "per output channel" in resolve_scheme("int8").describe()
    assert resolve_scheme(None) is None and resolve_scheme("none") is None


@pytest.mark.parametrize("args,flag,words", [
    (("int3",), "--quant", "int8"),
    (("INT8",), "--quant", "int8"),
    (("int4", 48), "--group-size", "blocks of 32"),
    (("int4", 0), "--group-size", "positive integer"),
    (("int4", True), "--group-size", "positive integer"),
    (("int4", "64"), "--group-size", "positive integer"),
    ((None, 64), "--group-size", "only with --quant"),
    ((None, None, True), "--quant-head", "only with --quant"),
    (("int8", None, "yes"), "--quant-head", "true or false"),
])
def test_bad_scheme_arguments(args, flag, words):
    with pytest.raises(UserError, match=flag) as e:
        resolve_scheme(*args)
    assert words in str(e.value)


def test_group_size_must_divide_the_input_dimension():
    with pytest.raises(UserError, match="does not divide the input dimension 96 of w1"):
        quantize(weight(8, 96), "int4", 64, what="w1")
    assert isinstance(quantize(weight(8, 96), "int4", 32), QuantWeight)


def test_scheme_labels():
    from model.quant import parse_label

    assert parse_label("none") == (None, None) and parse_label("int8") == ("int8", None)
    assert parse_label("int4") == ("int4", None) and parse_label("int4-g128") == ("int4", 128)
    for bad in ("int4-g", "int4-gx", "int5", "none-g32", "", "int8-g-1"):
        with pytest.raises(UserError, match="--quants: expected entries"):
            parse_label(bad)
