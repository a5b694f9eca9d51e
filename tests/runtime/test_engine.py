"""Float32 parity of the engine with Hugging Face LlamaForCausalLM: prefill, every decode step, greedy text."""

import pytest
import torch

import runtime
from model.errors import UserError
from bench.hf_reference import (
    STORIES,
    TINY_CONFIGS,
    hf_model,
    make_tiny_llama,
    rel_err,
    step_errors,
)

TOL = 1e-4


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp(request.param), *TINY_CONFIGS[request.param])


def check_parity(path, prompt_len=64, steps=32, seed=0):
    engine = runtime.load(str(path), dtype="float32", device="cpu")
    hf = hf_model(path)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, engine.config.vocab_size, (1, prompt_len), generator=g)
    errs, _, _ = step_errors(engine, hf, prompt, steps)
    assert max(errs) < TOL, f"rel errors prefill {errs[0]:.2e}, decode max {max(errs[1:]):.2e}"
    # full-sequence scoring logits agree too
    full = engine.logits(prompt)[0]
    assert rel_err(full, hf(prompt).logits[0]) < TOL
    return errs


def test_stories_parity():
    check_parity(STORIES)


def test_tiny_parity(tiny):
    check_parity(tiny)


def test_smollm2_parity(smollm2):
    check_parity(smollm2)


@pytest.mark.parametrize("which", ["stories", "smollm2"])
def test_greedy_generation_matches_hf(which, request):
    path = STORIES if which == "stories" else request.getfixturevalue("smollm2")
    engine = runtime.load(str(path), dtype="float32", device="cpu")
    hf = hf_model(path)
    prompt = "Once upon a time" if which == "stories" else "The capital of France is"
    ids = engine.tokenizer.encode(prompt)
    ours = engine.generate([ids], max_new_tokens=64).tokens[0]
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref


def test_greedy_generation_matches_hf_tiny(tiny):
    engine = runtime.load(str(tiny), dtype="float32", device="cpu")
    hf = hf_model(tiny)
    ids = [1, 50, 60, 70, 80]
    ours = engine.generate([ids], max_new_tokens=64, stop_at_eos=False).tokens[0]
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert ours == ref[0, len(ids):].tolist()


def test_left_padded_batch_equals_single_rows():
    engine = runtime.load(str(STORIES), dtype="float32", device="cpu")
    prompts = ["Once upon a time", "The little dog ran to the big tree and", "Tom"]
    batch = engine.generate(prompts, max_new_tokens=24)
    for i, p in enumerate(prompts):
        assert batch.tokens[i] == engine.generate(p, max_new_tokens=24).tokens[0]


def test_left_padded_batch_matches_hf_attention_mask():
    engine = runtime.load(str(STORIES), dtype="float32", device="cpu")
    hf = hf_model(STORIES)
    ids = [engine.tokenizer.encode(p) for p in ["Once upon a time", "A cat sat on the mat and looked at"]]
    ours = engine.generate(ids, max_new_tokens=16, stop_at_eos=False).tokens
    T = max(map(len, ids))
    inp = torch.tensor([[0] * (T - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ids])
    with torch.inference_mode():
        ref = hf.generate(inp, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          pad_token_id=0)
    assert ours == ref[:, T:].tolist()


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    engine = runtime.load(str(STORIES), dtype="float32", device="cpu")
    a = engine.generate("Once upon a time", max_new_tokens=20, temperature=1.0, seed=3).tokens
    b = engine.generate("Once upon a time", max_new_tokens=20, temperature=1.0, seed=3).tokens
    c = engine.generate("Once upon a time", max_new_tokens=20, temperature=1.0, seed=4).tokens
    assert a == b and a != c
    greedy = engine.generate("Once upon a time", max_new_tokens=20).tokens
    assert engine.generate("Once upon a time", max_new_tokens=20, temperature=0.8, top_k=1, seed=5).tokens == greedy
    assert engine.generate("Once upon a time", max_new_tokens=20, temperature=0.8, top_p=1e-6, seed=5).tokens == greedy


def test_stops_at_eos_and_budget():
    engine = runtime.load(str(STORIES), dtype="float32", device="cpu")
    free = engine.generate("Once upon a time", max_new_tokens=30).tokens[0]
    assert len(free) == 30 and len(engine.generate("Once upon a time", max_new_tokens=7).tokens[0]) == 7
    # stories260K never emits </s>; make the 5th greedy token an EOS and check generation stops there
    engine.tokenizer.eos_ids = (free[4],)
    g = engine.generate("Once upon a time", max_new_tokens=30)
    assert g.finished == [True] and g.tokens[0] == free[: free.index(free[4]) + 1]
    # a batch: a finished row stops growing while the other goes on
    b = engine.generate(["Once upon a time", "Tom"], max_new_tokens=30)
    assert b.tokens[0] == g.tokens[0] and len(b.tokens[1]) > 0


def test_stop_sequences_end_a_row_and_cut_its_text():
    engine = runtime.load(str(STORIES), dtype="float32", device="cpu")
    free = engine.generate("Once upon a time", max_new_tokens=40)
    assert "Lily." in free.texts[0]
    g = engine.generate(["Once upon a time", "Once upon a time"], max_new_tokens=40, stop_sequences=["Lily"])
    cut = free.texts[0][: free.texts[0].index("Lily")]
    assert g.texts == [cut, cut] and g.finished == [True, True] and len(g.tokens[0]) < 40


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton on CPU tensors needs the interpreter, which is off "
                    "where CUDA exists (tests/runtime/test_engine_cuda.py covers the kernels there)")
def test_triton_path_matches_hf(monkeypatch):
    """The whole model on the Triton kernels (interpreter on CPU), with a plan that drops attention
    (layer 0's included): prefill and decode logits within 1e-4 of HF with the same sublayers skipped,
    greedy tokens identical."""
    from bench.hf_reference import skip_sublayers

    monkeypatch.setenv("SUBLAYER_TRITON", "1")
    plan = {"version": 1, "name": "attn-0-3", "drop": {"attention": [0, 3]}}
    engine = runtime.load(str(STORIES), plan=plan, dtype="float32", device="cpu")
    hf = hf_model(STORIES)
    skip_sublayers(hf, engine.plan)
    prompt = torch.tensor([engine.tokenizer.encode("Once upon a time there was a big")])
    errs, hf_greedy, _ = step_errors(engine, hf, prompt, 6)
    assert max(errs) < TOL, errs
    assert engine.generate(prompt.tolist(), max_new_tokens=7).tokens[0] == hf_greedy


def test_load_shape_builds_a_random_engine_without_checkpoint(monkeypatch):
    """--shape mode: the named config, random weights for every kept tensor, decode runs (no tokenizer)."""
    from model import shapes
    from runtime.engine import load_shape

    tiny = {**shapes.SHAPES["llama2-7b"], "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300}
    monkeypatch.setitem(shapes.SHAPES, "tiny", tiny)
    engine = load_shape("tiny", plan="attn66", dtype="float32", device="cpu")
    assert engine.tokenizer is None and list(engine.plan.drop_attention) == [2]
    assert not any(".2.self_attn" in n for n in engine.names_read)
    logits = engine.logits([5, 6, 7])
    assert logits.shape == (1, 3, 300) and bool(torch.isfinite(logits).all()) and float(logits.std()) > 0
    with pytest.raises(UserError, match="--shape"):
        load_shape("llama9")


def test_with_plan_shares_weights_and_equals_a_fresh_load():
    full = runtime.load(str(STORIES), dtype="float32", device="cpu", compile=False)
    sub = full.with_plan("attn66")
    fresh = runtime.load(str(STORIES), plan="attn66", dtype="float32", device="cpu", compile=False)
    ids = list(range(3, 40))
    assert torch.equal(sub.logits(ids), fresh.logits(ids))
    assert sub.layers[0].qkv is full.layers[0].qkv  # shared, not copied
    assert sub.weight_bytes == fresh.weight_bytes
    with pytest.raises(UserError, match="keeps sublayers"):
        sub.with_plan("full")
