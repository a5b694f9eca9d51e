"""tools.export: Nemotron-NAS / LLM-Drop exports load back bit-identically; configs fit vLLM's reader."""

import json
import math

import pytest
import torch
from safetensors import safe_open

import runtime
from model.config import load_config
from model.errors import UserError
from model.formats import ffn_mult_to_intermediate_size
from runtime.schedule import compile_plan, needed_tensors
from runtime.plan import load_plan
from bench.hf_reference import STORIES
from tools.export import export, main

MIXED = {"version": 1, "name": "mixed", "drop": {"attention": [1, 3], "mlp": [2], "block": [4]}}
MIXED0 = {"version": 1, "name": "mixed0", "drop": {"attention": [0, 2], "mlp": [1, 4]}}  # layer 0's attention


def stored_tensors(d):
    files = sorted(d.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                out[name] = tuple(h.get_slice(name).get_shape())
    return out


def check_vllm_schema(cfg, src_config, plan):
    """The fields vllm/model_executor/models/nemotron_nas.py (DeciLMDecoderLayer, DeciModel, DeciLMForCausalLM)
    and NemotronNasModelArchConfigConvertor read, with the types they need."""
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert cfg["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    for name, kind in (("hidden_size", int), ("num_hidden_layers", int), ("num_attention_heads", int),
                       ("vocab_size", int), ("rms_norm_eps", float), ("tie_word_embeddings", bool),
                       ("hidden_act", str), ("max_position_embeddings", int), ("rope_parameters", dict)):
        assert isinstance(cfg[name], kind) and not (kind is int and isinstance(cfg[name], bool)), name
    assert cfg["num_key_value_heads"] is None and cfg["intermediate_size"] is None
    assert cfg["rope_parameters"]["rope_theta"] == src_config.rope_theta
    assert cfg["attention_bias"] is False and cfg["mlp_bias"] is False
    L, H, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    assert L == src_config.num_layers and len(cfg["block_configs"]) == L
    for i, b in enumerate(cfg["block_configs"]):
        a, f = b["attention"], b["ffn"]
        assert isinstance(a["no_op"], bool) and a["replace_with_linear"] is False
        assert isinstance(f["no_op"], bool) and f["replace_with_linear"] is False
        assert a["no_op"] == (i in plan.drop_attention) and f["no_op"] == (i in plan.drop_mlp)
        if not a["no_op"]:
            g = a["n_heads_in_group"]
            assert isinstance(g, int) and heads // g == src_config.num_kv_heads
        if not f["no_op"]:
            if "ffn_mult" in f:  # vLLM: hasattr(ffn, "ffn_mult") -> formula
                assert isinstance(f["ffn_mult"], float)
                assert ffn_mult_to_intermediate_size(round(f["ffn_mult"], 6), H) == src_config.intermediate_size
            else:  # explicit field, read where the ffn config has no ffn_mult attribute
                assert f["intermediate_size"] == src_config.intermediate_size


def check_vllm_tensors(stored, cfg, src_config):
    """Names/shapes DeciModel.load_weights maps onto qkv_proj / gate_up_proj; nothing for a no-op sublayer."""
    H, D, heads = src_config.hidden_size, src_config.head_dim, cfg["num_attention_heads"]
    for i, b in enumerate(cfg["block_configs"]):
        p = f"model.layers.{i}."
        attn = {p + "input_layernorm.weight"} | {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        mlp = {p + "post_attention_layernorm.weight"} | {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        if b["attention"]["no_op"]:
            assert not attn & set(stored)
        else:
            kv = heads // b["attention"]["n_heads_in_group"] * D
            assert stored[p + "self_attn.q_proj.weight"] == (heads * D, H)
            assert stored[p + "self_attn.k_proj.weight"] == stored[p + "self_attn.v_proj.weight"] == (kv, H)
            assert stored[p + "self_attn.o_proj.weight"] == (H, heads * D)
        if b["ffn"]["no_op"]:
            assert not mlp & set(stored)
        else:
            f = b["ffn"]
            I = ffn_mult_to_intermediate_size(f["ffn_mult"], H) if "ffn_mult" in f else f["intermediate_size"]
            assert stored[p + "mlp.gate_proj.weight"] == stored[p + "mlp.up_proj.weight"] == (I, H)
            assert stored[p + "mlp.down_proj.weight"] == (H, I)
    assert ("lm_head.weight" in stored) == (not cfg["tie_word_embeddings"])


def round_trip(src, plan, fmt, out, ids):
    info = export(str(src), plan, fmt, out, progress=False)
    config = load_config(src)
    resolved = load_plan(plan, config.num_layers)
    stored = stored_tensors(out)
    assert stored == needed_tensors(compile_plan(resolved, config).steps, config)  # exactly the kept tensors
    cfg = json.loads((out / "config.json").read_text())
    if fmt == "nemotron-nas":
        check_vllm_schema(cfg, config, resolved)
        check_vllm_tensors(stored, cfg, config)
    else:
        assert cfg["model_type"] == "llama" and cfg["drop_attn_list"] == sorted(resolved.drop_attention)
        assert cfg["drop_mlp_list"] == sorted(resolved.drop_mlp)
    ref = runtime.load(str(src), plan=plan, dtype="float32", device="cpu", show_progress=False)
    got = runtime.load(str(out), dtype="float32", device="cpu", show_progress=False)
    assert got.plan.drop_attention == resolved.drop_attention and got.plan.drop_mlp == resolved.drop_mlp
    assert torch.equal(ref.logits(ids), got.logits(ids))
    assert info["written"] == sum(math.prod(s) for s in stored.values()) * 4
    return info, cfg


@pytest.mark.parametrize("fmt", ["nemotron-nas", "llm-drop"])
@pytest.mark.parametrize("plan", ["attn66", "mlp66", "block66", MIXED])
def test_stories_round_trip(fmt, plan, tmp_path):
    info, cfg = round_trip(STORIES, plan, fmt, tmp_path / "out", [1, 45, 300, 7, 99, 12])
    if fmt == "nemotron-nas":  # 172 is no round_up(.., 256): the explicit field is written, and said so
        assert all("ffn_mult" not in b["ffn"] for b in cfg["block_configs"] if not b["ffn"]["no_op"])
        assert any("intermediate_size" in n for n in info["notes"])
        assert (tmp_path / "out" / "configuration_decilm.py").is_file()
    assert {"tokenizer.json", "tokenizer.model", "README.md"} <= set(info["files"])


def test_llm_drop_layer0_attention_and_sharding(tmp_path):
    out = tmp_path / "out"
    export(str(STORIES), MIXED0, "llm-drop", out, shard_size="100KB", progress=False)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    ids = [1, 45, 300, 7]
    ref = runtime.load(str(STORIES), plan=MIXED0, dtype="float32", device="cpu")
    assert torch.equal(ref.logits(ids), runtime.load(str(out), dtype="float32", device="cpu").logits(ids))


def test_remote_code_config_loads(tmp_path):
    """The written configuration_decilm.py gives vLLM's attribute access (transformers 5.24, no vLLM)."""
    from transformers import AutoConfig

    out = tmp_path / "out"
    export(str(STORIES), "block66", "nemotron-nas", out, progress=False)
    c = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    b0, b4 = c.block_configs[0], c.block_configs[4]
    assert b0.attention.no_op is False and b0.attention.n_heads_in_group == 2 and b4.attention.no_op is True
    assert not hasattr(b0.ffn, "ffn_mult") and b0.ffn.intermediate_size == 172
    assert c.rope_parameters["rope_theta"] == 10000.0 and c.num_hidden_layers == 5


def test_smollm2_attn66_nemotron(smollm2, tmp_path):
    info, cfg = round_trip(smollm2, "attn66", "nemotron-nas", tmp_path / "out", [1, 504, 3458, 314, 28, 2])
    assert {b["ffn"]["ffn_mult"] for b in cfg["block_configs"]} == {4.0} and not info["notes"]
    assert info["written"] < info["full"]


def test_errors(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(UserError, match=r"out: already exists and is not empty \(pass --force"):
        export(str(STORIES), "attn66", "llm-drop", out, progress=False)
    with pytest.raises(UserError, match="--format: expected one of nemotron-nas, llm-drop, auto"):
        export(str(STORIES), "attn66", "gguf", tmp_path / "o2", progress=False)
    with pytest.raises(UserError, match=r"'drop.attention' has layer 7, expected 0..4"):
        export(str(STORIES), {"version": 1, "drop": {"attention": [7]}}, "llm-drop", tmp_path / "o3", progress=False)
    with pytest.raises(UserError, match="first kept sublayer is layer 0's MLP"):
        export(str(STORIES), MIXED0, "nemotron-nas", tmp_path / "o4", progress=False)
    with pytest.raises(UserError, match="the output directory is the input"):
        export(str(STORIES), "attn66", "llm-drop", STORIES, force=True, progress=False)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o4").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    # CLI: "error: ..." on stderr, exit 2, no traceback; --force replaces
    assert main(["--model", str(STORIES), "--plan", "attn66", "--format", "llm-drop", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: already exists") and "Traceback" not in err
    assert main(["--model", str(STORIES), "--plan", "attn66", "--format", "llm-drop", "--out", str(out), "--force"]) == 0
    assert "weights written:" in capsys.readouterr().err and not (out / "x").exists()
    # a checkpoint that carries a plan refuses another one; generate needs no --plan
    with pytest.raises(UserError, match="already carries a plan"):
        runtime.load(str(out), plan="full")
    from runtime.generate import main as generate

    assert generate(["--model", str(out), "--prompt", "Once", "--max-new-tokens", "2"]) == 0
    assert generate(["--model", str(out), "--plan", "attn66", "--prompt", "Once"]) == 2
    # bad checkpoints: Nemotron-NAS replace_with_linear, LLM-Drop index out of range
    nas = tmp_path / "nas"
    export(str(STORIES), "attn66", "nemotron-nas", nas, progress=False)
    cfg = json.loads((nas / "config.json").read_text())
    cfg["block_configs"][1]["ffn"]["replace_with_linear"] = True
    (nas / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"block_configs\[1\]\.ffn\.replace_with_linear.*not supported"):
        runtime.load(str(nas))
    cfg = json.loads((out / "config.json").read_text())
    cfg["drop_mlp_list"] = [5]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"'drop_mlp_list' has layer 5, expected 0..4"):
        runtime.load(str(out))


def modes(root):
    """(directory modes, file modes) under ``root``, itself included."""
    import stat

    paths = [root, *root.rglob("*")]
    return ({stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()},
            {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()})


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_export_modes_follow_umask(tmp_path, mask):
    """Readable by other users under 022 (not mkdtemp's 0700 / 0600); private under 077."""
    import os

    old = os.umask(mask)
    try:
        export(str(STORIES), "attn66", "nemotron-nas", tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    assert modes(tmp_path / "out") == ({0o777 & ~mask}, {0o666 & ~mask})
    ids = [1, 45, 300]
    assert torch.equal(runtime.load(str(tmp_path / "out"), dtype="float32", device="cpu").logits(ids),
                       runtime.load(str(STORIES), plan="attn66", dtype="float32", device="cpu").logits(ids))


def test_write_checkpoint_from_memory(tmp_path):
    """Healing's route: tensors held in memory, format chosen like tools.export (auto: LLM-Drop when
    Nemotron-NAS cannot express layer 0's dropped attention), the plan file treated as an input."""
    from safetensors.torch import load_file

    from tools.export import write_checkpoint

    config = load_config(STORIES)
    shapes = needed_tensors(compile_plan(load_plan(MIXED0, config.num_layers), config).steps, config)
    src = {k: v for f in STORIES.glob("*.safetensors") for k, v in load_file(f).items()}
    tensors = {name: src[name] * 2 for name in shapes}
    info = write_checkpoint(tensors, STORIES, MIXED0, tmp_path / "healed", extra_source={"tool": "tools.heal"},
                            progress=False)
    cfg = json.loads((tmp_path / "healed" / "config.json").read_text())
    assert info["format"] == "llm-drop" and cfg["drop_attn_list"] == [0, 2]
    assert cfg["sublayer_plan"]["source"]["tool"] == "tools.heal"
    got = load_file(tmp_path / "healed" / "model.safetensors")
    assert set(got) == set(shapes) and all(torch.equal(got[k], tensors[k]) for k in got)
    mixed = needed_tensors(compile_plan(load_plan(MIXED, config.num_layers), config).steps, config)
    assert write_checkpoint({k: src[k] for k in mixed}, STORIES, MIXED, tmp_path / "nas",
                            progress=False)["format"] == "nemotron-nas"
    plan_file = tmp_path / "healed" / "plan.json"
    plan_file.write_text(json.dumps(MIXED0))
    with pytest.raises(UserError, match="the output directory contains the input"):
        write_checkpoint(tensors, STORIES, str(plan_file), tmp_path / "healed", force=True, progress=False)
    with pytest.raises(ValueError, match="missing"):
        write_checkpoint({}, STORIES, MIXED0, tmp_path / "x", progress=False)
    info = write_checkpoint({k: v.bfloat16() for k, v in tensors.items()}, STORIES, MIXED0, tmp_path / "bf16",
                            progress=False)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert info["written"] * 2 == sum(t.numel() * 4 for t in tensors.values()) and info["full"] == 1040128 // 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "healed", "nas"]
