"""``Engine.decode_step``: the step functions of ``runtime.step`` compiled on CPU, against Hugging Face and
the same functions run eagerly; the fast path is taken by ``decode_step`` only, never by ``forward``."""

import pytest
import torch

import runtime
from bench.hf_reference import (
    STORIES,
    TINY_CONFIGS,
    hf_model,
    make_tiny_llama,
    plan_parity,
    rel_err,
    skip_sublayers,
    step_errors,
)

@pytest.mark.parametrize("plan", [None, "attn66", "block66",
                                  {"version": 1, "drop": {"attention": [0, 3], "mlp": [1]}},
                                  {"version": 1, "drop": {"block": [0]}}])
def test_stories_parity_with_hf(plan):
    """Every decode step within 1e-4 of HF (same sublayers skipped), greedy tokens identical; the plans
    include a first step that is an MLP (nothing pending) and a dropped layer-0 attention."""
    engine = runtime.load(str(STORIES), plan=plan, dtype="float32", device="cpu")
    assert engine.decode_mode == "compiled"
    hf = hf_model(STORIES)
    skip_sublayers(hf, engine.plan)
    prompt = torch.randint(3, engine.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    errs, hf_greedy, ours = step_errors(engine, hf, prompt, 12)
    assert max(errs) < 1e-4, errs
    assert ours == hf_greedy


@pytest.mark.parametrize("name", ["gqa3-odd", "gqa4-tied"])
def test_tiny_gqa_parity_with_hf(tmp_path, name):
    path = make_tiny_llama(tmp_path / name, *TINY_CONFIGS[name])
    plan_parity(path, hf_model(path), "attn66", prompt_len=20, steps=8)


def test_matches_eager_on_left_padded_batch():
    """Batch of prompts of different lengths (left padding, per-row positions and kv_start): the compiled
    decode gives the eager reference's tokens and logits; the cache is rebuilt at another length too."""
    prompts = ["Once upon a time", "The little dog ran to the park and saw", "Lily"]
    compiled = runtime.load(str(STORIES), plan="attn66", dtype="float32", device="cpu")
    eager = runtime.load(str(STORIES), plan="attn66", dtype="float32", device="cpu", compile=False)
    assert eager.decode_mode == "eager"
    for n in (9, 23):  # two cache lengths: the compiled step is reused or rebuilt for the new length
        a = compiled.generate(prompts, max_new_tokens=n, stop_at_eos=False)
        b = eager.generate(prompts, max_new_tokens=n, stop_at_eos=False)
        assert a.tokens == b.tokens

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
    kv_start = torch.tensor([0, 2], dtype=torch.int32)
    positions = (torch.arange(6)[None] - kv_start[:, None]).clamp(min=0)
    caches = [e.new_cache(2, 8) for e in (compiled, eager)]
    for e, cache in zip((compiled, eager), caches):
        e.forward(ids, cache, 0, kv_start, positions)
    step = torch.tensor([[20], [21]])
    a = compiled.decode_step(step, caches[0], torch.tensor([6, 6]), kv_start)
    b = eager.decode_step(step, caches[1], torch.tensor([6, 6]), kv_start)
    assert rel_err(a, b) < 1e-5
    # the compiled step wrote the new K/V where the eager one did
    assert torch.allclose(caches[0].k[:, :, :, 6], caches[1].k[:, :, :, 6], atol=1e-6)
    assert torch.allclose(caches[0].v[:, :, :, 6], caches[1].v[:, :, :, 6], atol=1e-6)


def test_bfloat16_close_to_eager():
    """bfloat16: the compiled step accumulates products in float32 where F.linear rounds differently,
    so the two agree to bfloat16 precision, not bit for bit."""
    compiled = runtime.load(str(STORIES), dtype="bfloat16", device="cpu")
    eager = runtime.load(str(STORIES), dtype="bfloat16", device="cpu", compile=False)
    ids = torch.randint(3, 512, (1, 30), generator=torch.Generator().manual_seed(0))
    out = []
    for e in (compiled, eager):
        cache = e.new_cache(1, 31)
        kv0 = torch.zeros(1, dtype=torch.int32)
        e.forward(ids, cache, 0, kv0, torch.arange(30)[None])
        out.append(e.decode_step(torch.tensor([[7]]), cache, torch.tensor([30]), kv0).float())
    assert rel_err(out[0], out[1]) < 2e-2


def test_smollm2_parity_with_hf(smollm2):
    plan_parity(smollm2, hf_model(smollm2), "imp-attn10", prompt_len=48, steps=8)
