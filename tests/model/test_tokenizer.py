"""Our tokenizer matches the checkpoint's own (transformers AutoTokenizer), BOS/EOS included."""

import shutil

from transformers import AutoTokenizer

from model.tokenizer import Tokenizer
from tests.models import STORIES

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
