"""``runtime.generation`` through the Python API: the text of new tokens at the prompt boundary
(SentencePiece and byte-level BPE), argument validation as the CLI does it, engines without a tokenizer."""

import shutil

import pytest

import runtime
from bench.hf_reference import STORIES
from model.errors import UserError


@pytest.fixture(scope="module")
def stories():
    return runtime.load(str(STORIES), dtype="float32", device="cpu", compile=False)


def check_boundary(engine, prompt, n=6):
    g = engine.generate(prompt, max_new_tokens=n, stop_at_eos=False)
    ids = engine.tokenizer.encode(prompt)
    whole = engine.tokenizer.decode(ids + g.tokens[0])
    prompt_text = engine.tokenizer.decode(ids)
    assert prompt_text + g.texts[0] == whole
    return prompt_text, g.texts[0]


@pytest.mark.parametrize("prompt", ["Once", "Once up", "Once upon a "])
def test_sentencepiece_text_keeps_the_boundary(tmp_path_factory, prompt):
    """A copy of stories260K with only tokenizer.model (the SentencePiece path)."""
    d = tmp_path_factory.mktemp("sp")
    for f in STORIES.iterdir():
        if f.name != "tokenizer.json":
            shutil.copy(f, d / f.name)
    engine = runtime.load(str(d), dtype="float32", device="cpu", compile=False)
    assert engine.tokenizer._sp is not None
    _, text = check_boundary(engine, prompt)
    if prompt == "Once":
        assert text.startswith(" upon")


@pytest.mark.parametrize("prompt", ["Once", "Once upon a "])
def test_tokenizer_json_text_keeps_the_boundary(stories, prompt):
    check_boundary(stories, prompt)


@pytest.mark.parametrize("prompt", ["The capital of Fra", "The capital of France is "])
def test_byte_level_bpe_text_keeps_the_boundary(smollm2, prompt):
    engine = runtime.load(str(smollm2), dtype="float32", device="cpu", compile=False)
    prompt_text, text = check_boundary(engine, prompt, n=4)
    assert prompt_text == prompt


@pytest.mark.parametrize("kwargs, flag", [
    ({"temperature": float("nan")}, "--temperature"), ({"temperature": -0.5}, "--temperature"),
    ({"temperature": "1"}, "--temperature"), ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"),
    ({"top_k": -3}, "--top-k"), ({"top_k": 2.5}, "--top-k"), ({"seed": -1}, "--seed"), ({"seed": 2**63}, "--seed"),
    ({"seed": 1.0}, "--seed"), ({"max_new_tokens": -1}, "--max-new-tokens"),
])
def test_sampling_arguments_are_validated(stories, kwargs, flag):
    with pytest.raises(UserError, match=flag):
        stories.generate("Once", **kwargs)


@pytest.mark.parametrize("ids", [[[1, 600]], [[1, -1]], [[1, 2.0]], [[True, 5]]])
def test_token_ids_are_validated(stories, ids):
    with pytest.raises(UserError, match=r"prompt token ids: expected integers in 0\.\.511"):
        stories.generate(ids, max_new_tokens=2)
    with pytest.raises(UserError, match="token ids"):
        stories.logits(ids)


def test_shape_engine_fails_cleanly_in_generate(monkeypatch):
    from model import shapes
    from runtime.engine import load_shape

    tiny = {**shapes.SHAPES["llama2-7b"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300}
    monkeypatch.setitem(shapes.SHAPES, "tiny", tiny)
    engine = load_shape("tiny", dtype="float32", device="cpu", compile=False)
    for prompts in ("Once", [[1, 2, 3]]):
        with pytest.raises(UserError, match="no tokenizer"):
            engine.generate(prompts, max_new_tokens=2)
