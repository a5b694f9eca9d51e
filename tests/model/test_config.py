"""config.json parsing: both layouts, GQA, Llama-3 rope scaling, and clear errors for what we don't run."""


import pytest

from model.config import load_config, parse_config
from model.errors import UserError
from bench.hf_reference import STORIES

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": 32000,
             "max_position_embeddings": 4096, "tie_word_embeddings": False, "bos_token_id": 1,
             "eos_token_id": 2, "torch_dtype": "float16", "rope_scaling": None}
LLAMA3_8B = dict(LLAMA2_7B, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                 rope_theta=500000.0, eos_token_id=[128001, 128008, 128009], bos_token_id=128000,
                 rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"})
MISTRAL = dict(LLAMA2_7B, architectures=["MistralForCausalLM"], model_type="mistral",
               num_key_value_heads=8, sliding_window=None)


def test_stories():
    c = load_config(STORIES)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.tie_word_embeddings) == (5, 8, 4, 8, True)


def test_llama2_llama3_mistral():
    assert parse_config(LLAMA2_7B).head_dim == 128
    c3 = parse_config(LLAMA3_8B)
    assert c3.num_kv_heads == 8 and c3.rope_scaling["rope_type"] == "llama3" and c3.eos_token_ids == (128001, 128008, 128009)
    assert parse_config(MISTRAL).num_kv_heads == 8


def test_transformers5_layout():
    raw = dict(LLAMA2_7B)
    del raw["rope_theta"], raw["torch_dtype"], raw["rope_scaling"]
    raw |= {"rope_parameters": {"rope_theta": 123.0, "rope_type": "default"}, "dtype": "bfloat16"}
    c = parse_config(raw)
    assert c.rope_theta == 123.0 and c.rope_scaling is None and c.torch_dtype == "bfloat16"
    raw["rope_parameters"] = dict(LLAMA3_8B["rope_scaling"], rope_theta=5e5)
    assert parse_config(raw).rope_scaling["factor"] == 8.0


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "architectures"),
    ({"model_type": "qwen2"}, "model_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"hidden_size": "4096"}, "hidden_size"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
])
def test_unsupported_is_a_clear_error(change, field):
    with pytest.raises(UserError, match=field):
        parse_config(dict(LLAMA2_7B, **change))


def test_missing_field_and_missing_file(tmp_path):
    raw = dict(LLAMA2_7B)
    del raw["intermediate_size"]
    with pytest.raises(UserError, match="intermediate_size"):
        parse_config(raw)
    with pytest.raises(UserError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        load_config(tmp_path)
    with pytest.raises(UserError, match="no such"):
        load_config(tmp_path / "nope")
