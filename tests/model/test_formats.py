"""Nemotron-NAS and LLM-Drop configs -> plain Llama config + explicit plan (model.formats)."""

import pytest

from model.errors import UserError
from model.formats import (checkpoint_plan, ffn_mult_to_intermediate_size, intermediate_size_to_ffn_mult)

BASE = {"hidden_size": 576, "num_hidden_layers": 3, "num_attention_heads": 9, "vocab_size": 100,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu"}


def nas(blocks, **extra):
    return {**BASE, "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
            "num_key_value_heads": None, "intermediate_size": None, "block_configs": blocks, **extra}


def blk(attn_noop=False, ffn_noop=False, g=3, mult=4.0, **ffn):
    return {"attention": {"no_op": attn_noop, "replace_with_linear": False, "n_heads_in_group": None if attn_noop else g},
            "ffn": {"no_op": ffn_noop, "replace_with_linear": False,
                    **({} if ffn_noop else ({"ffn_mult": mult} if not ffn else ffn))}}


def test_vllm_formula():
    # vLLM nemotron_nas.py: _ffn_mult_to_intermediate_size = round_up(int(2 * m * H / 3), 256)
    assert ffn_mult_to_intermediate_size(4.0, 576) == 1536          # SmolLM2: exactly expressible
    assert intermediate_size_to_ffn_mult(1536, 576) == 4.0
    assert intermediate_size_to_ffn_mult(172, 64) is None            # stories260K: never a multiple of 256
    assert ffn_mult_to_intermediate_size(1.3125, 8192) == 7168
    for size, hidden in ((14336, 4096), (28672, 8192), (5632, 2048), (2816, 1024)):
        m = intermediate_size_to_ffn_mult(size, hidden)
        assert m is not None and ffn_mult_to_intermediate_size(round(m, 6), hidden) == size


def test_nemotron_to_llama():
    raw, plan = checkpoint_plan("d", nas([blk(), blk(attn_noop=True), blk(attn_noop=True, ffn_noop=True)]))
    assert raw["model_type"] == "llama" and raw["architectures"] == ["LlamaForCausalLM"]
    assert raw["num_key_value_heads"] == 3 and raw["intermediate_size"] == 1536 and "block_configs" not in raw
    assert plan == {"version": 1, "name": "nemotron-nas", "drop": {"attention": [1, 2], "mlp": [2]}}
    raw, plan = checkpoint_plan("d", nas([blk(intermediate_size=1000)] * 3))
    assert raw["intermediate_size"] == 1000 and plan is None


@pytest.mark.parametrize("blocks, match", [
    ([blk(), blk(g=9), blk()], r"block_configs\[1\]\.attention.*n_heads_in_group"),
    ([blk(), blk(), blk(mult=2.0)], r"block_configs\[2\]\.ffn"),
    ([blk(), {"attention": {"no_op": False, "replace_with_linear": True}, "ffn": {"no_op": True}}, blk()],
     r"block_configs\[1\]\.attention\.replace_with_linear.*not supported"),
    ([blk(), blk()], r"block_configs.*3 entries"),
    ([blk(), blk(g=2), blk()], r"n_heads_in_group.*divisor"),
])
def test_nemotron_errors(blocks, match):
    with pytest.raises(UserError, match=match):
        checkpoint_plan("d", nas(blocks))


def test_llm_drop():
    raw, plan = checkpoint_plan("d", {**BASE, "drop_attn_list": [2, 0], "drop_mlp_list": [False, True, False]})
    assert plan["drop"] == {"attention": [0, 2], "mlp": [1]} and "drop_attn_list" not in raw
    assert checkpoint_plan("d", {**BASE, "drop_attn_list": [], "drop_mlp_list": []})[1] is None
    assert checkpoint_plan("d", dict(BASE)) == (BASE, None)


@pytest.mark.parametrize("field, value, match", [
    ("drop_attn_list", [3], r"'drop_attn_list' has layer 3, expected 0\.\.2"),
    ("drop_mlp_list", [-1], r"'drop_mlp_list' has layer -1"),
    ("drop_mlp_list", [True, False], r"'drop_mlp_list'.*2 booleans"),
    ("drop_attn_list", "1", r"'drop_attn_list' must be a list"),
])
def test_llm_drop_errors(field, value, match):
    with pytest.raises(UserError, match=match):
        checkpoint_plan("d", {**BASE, field: value})
