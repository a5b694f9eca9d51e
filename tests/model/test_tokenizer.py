"""Our tokenizer matches the checkpoint's own (transformers AutoTokenizer), BOS/EOS included."""

import shutil

from transformers import AutoTokenizer

from model.tokenizer import Tokenizer
from bench.hf_reference import STORIES

TEXTS = ["Once upon a time", " leading space", "Tabs\tand\nnewlines  x", "naïve café ☃", ""]


def test_stories_tokenizer_json_matches_hf():
    ours, hf = Tokenizer(STORIES, 1, (2,)), AutoTokenizer.from_pretrained(STORIES)
    for t in TEXTS:
        assert ours.encode(t) == hf(t).input_ids
        ids = hf(t).input_ids
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_sentencepiece_model_path(tmp_path):
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(STORIES / f, tmp_path / f)
    ours, hf = Tokenizer(tmp_path, 1, (2,)), AutoTokenizer.from_pretrained(STORIES)
    for t in ["Once upon a time", "Hello world", "naïve café ☃"]:  # no leading space: see SOURCE.md
        assert ours.encode(t) == hf(t).input_ids
    assert ours.bos_id == 1 and ours.eos_ids == (2,)


def test_smollm2_tokenizer_matches_hf(smollm2):
    ours, hf = Tokenizer(smollm2), AutoTokenizer.from_pretrained(smollm2)
    for t in TEXTS:
        assert ours.encode(t) == hf(t).input_ids
    msgs = [{"role": "user", "content": "Hi there"}]
    assert ours.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_bad_tokenizer_files_are_named(tmp_path):
    import json

    import pytest

    from model.errors import UserError

    shutil.copy(STORIES / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = tmp_path / "tokenizer_config.json"
    for template, word in (("{% if %}", "TemplateSyntaxError"), ("{{ raise_exception('no system role') }}", "no system role"),
                           ("{{ messages[3]['content'] }}", "UndefinedError")):
        cfg.write_text(json.dumps({"chat_template": template}))
        with pytest.raises(UserError, match=rf"tokenizer_config.json field 'chat_template': the chat template does not render .*{word}"):
            Tokenizer(tmp_path).encode_chat("Hi")
    cfg.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "<{{ messages[0]['content'] }}>"}]}))
    assert Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "Hi"}]) == "<Hi>"
    (tmp_path / "chat_template.jinja").write_text("{{ 1 / 0 }}")
    cfg.write_text(json.dumps({"bos_token": ["<s>"]}))
    with pytest.raises(UserError, match="tokenizer_config.json: field 'bos_token' must be a token string"):
        Tokenizer(tmp_path)
    cfg.write_text(json.dumps({"add_bos_token": "yes"}))
    with pytest.raises(UserError, match="tokenizer_config.json: field 'add_bos_token' must be true, false or null"):
        Tokenizer(tmp_path)
    cfg.write_text("{}")
    with pytest.raises(UserError, match=r"chat_template.jinja: the chat template does not render \(ZeroDivisionError"):
        Tokenizer(tmp_path).encode_chat("Hi")
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(UserError, match="tokenizer.model: not a readable SentencePiece model"):
        Tokenizer(tmp_path)
