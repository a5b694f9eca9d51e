"""Compiled plans: parity with a Hugging Face model whose same sublayers are skipped, and the proof
that dropped sublayers' weights are never read and their KV buffers never allocated."""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import runtime
from runtime.plan import load_plan, preset_plans
from bench.hf_reference import STORIES, hf_model, plan_parity

PRESETS = list(preset_plans())
# plans that drop layer 0's attention (HF reads the sequence length from layer 0's cache: CONVENTIONS)
EXTRA = {"layer0": {"version": 1, "name": "layer0", "drop": {"attention": [0, 2], "mlp": [1]}},
         "blocks": {"version": 1, "name": "blocks", "drop": {"block": [0, 3]}}}


@pytest.fixture(scope="module")
def stories_hf():
    return hf_model(STORIES)


@pytest.mark.parametrize("plan", PRESETS + list(EXTRA))
def test_stories_plan_parity(plan, stories_hf):
    plan_parity(STORIES, stories_hf, EXTRA.get(plan, plan))


@pytest.fixture(scope="module")
def smollm2_hf(smollm2):
    return hf_model(smollm2)


SMOLLM2_FAST = ["full", "attn66", "mlp75-keeplast", "block90"]


@pytest.mark.parametrize("plan", [p if p in SMOLLM2_FAST else pytest.param(p, marks=pytest.mark.slow)
                                  for p in PRESETS])
def test_smollm2_plan_parity(plan, smollm2, smollm2_hf):
    """Every preset on SmolLM2; four in the default run, the rest with ``pytest -m slow``."""
    plan_parity(smollm2, smollm2_hf, plan, prompt_len=48, steps=32)


@pytest.mark.parametrize("plan", ["full", "attn66", "mlp75-keeplast", "block90", EXTRA["layer0"]])
def test_kv_bytes_follow_the_formula(plan):
    engine = runtime.load(str(STORIES), plan=plan, dtype="float32", device="cpu")
    c = engine.config
    kept = c.num_layers - len(engine.plan.drop_attention)
    for batch, seq in [(1, 100), (3, 37)]:
        cache = engine.new_cache(batch, seq)
        expected = 2 * kept * batch * seq * c.num_kv_heads * c.head_dim * 4
        assert cache.nbytes == expected == engine.kv_bytes(seq, batch)
    assert engine.kv_bytes(100, full=True) == 2 * c.num_layers * 100 * c.num_kv_heads * c.head_dim * 4


def test_weight_bytes_count_only_kept_sublayers():
    full = runtime.load(str(STORIES), dtype="float32", device="cpu")
    for plan in ("attn66", "mlp66", "block66"):
        e = runtime.load(str(STORIES), plan=plan, dtype="float32", device="cpu")
        c = e.config
        attn = (c.hidden_size + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim * c.hidden_size
                + c.hidden_size * c.num_heads * c.head_dim) * 4
        mlp = (c.hidden_size + 3 * c.intermediate_size * c.hidden_size) * 4
        lost = len(e.plan.drop_attention) * attn + len(e.plan.drop_mlp) * mlp
        assert e.weight_bytes == full.weight_bytes - lost
        assert e.full_weight_bytes == full.weight_bytes
        loaded = sum(t.nbytes for w in e.layers for t in vars(w).values())
        assert loaded == e.weight_bytes - (e.embed.nbytes + e.final_norm.nbytes)  # tied head


def test_dropped_tensors_are_never_read(tmp_path):
    """A copy of the checkpoint whose dropped tensors are NaN gives the same logits under the plan."""
    plan = {"version": 1, "name": "mixed", "drop": {"attention": [0, 4], "mlp": [2], "block": [3]}}
    tensors = load_file(STORIES / "model.safetensors")
    resolved = load_plan(plan, 5)
    poisoned = 0
    for name in tensors:
        parts = name.split(".")
        if parts[1] != "layers":
            continue
        layer = int(parts[2])
        attn = parts[3] in ("self_attn", "input_layernorm")
        if (attn and layer in resolved.drop_attention) or (not attn and layer in resolved.drop_mlp):
            tensors[name] = torch.full_like(tensors[name], float("nan"))
            poisoned += 1
    assert poisoned == 3 * 5 + 2 * 4  # attention (with its norm): 5 tensors each, MLP: 4 each
    save_file(tensors, tmp_path / "model.safetensors")
    for f in STORIES.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    clean = runtime.load(str(STORIES), plan=plan, dtype="float32", device="cpu")
    nan = runtime.load(str(tmp_path), plan=plan, dtype="float32", device="cpu")
    assert torch.equal(clean.logits(ids), nan.logits(ids))
    read = set(nan.names_read)
    assert len(read) == len(nan.names_read)  # each tensor read once
    dropped_layers = {n for n in tensors if n.startswith("model.layers.") and torch.isnan(tensors[n]).all()}
    assert not read & dropped_layers and read | dropped_layers == set(tensors)
    assert torch.isnan(runtime.load(str(tmp_path), dtype="float32", device="cpu").logits(ids)).any()


RSS_SCRIPT = """
import re, sys, torch, runtime
e = runtime.load(sys.argv[1], plan=sys.argv[2], dtype="float32", device="cpu")
e.logits(torch.arange(3, 67)[None])
rss = int(re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(rss, e.weight_bytes)
"""


def test_resident_memory_falls_with_the_plan(smollm2):
    """Resident memory after loading and one forward pass, in fresh processes: attn66 and block66
    save about the bytes they do not load (within 25 MiB)."""
    def measure(plan):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(smollm2), plan], capture_output=True,
                             text=True, check=True).stdout.split()
        return int(out[0]), int(out[1])

    full_rss, full_w = measure("full")
    for plan in ("attn66", "block66"):
        rss, w = measure(plan)
        saved, expected = full_rss - rss, full_w - w
        assert expected > 0 and abs(saved - expected) < 25 * 2**20, (plan, saved, expected)
