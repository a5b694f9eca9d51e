"""``Engine.score`` / ``runtime.scoring.Scorer``: log-likelihoods of continuations after a shared prefix
equal those read off one full forward of prefix + continuation, for groups batched with left padding."""

import pytest
import torch
import torch.nn.functional as F

import runtime
from bench.hf_reference import STORIES
from model.errors import UserError
from runtime.scoring import Scorer, partition


@pytest.fixture(scope="module")
def engine():
    return runtime.load(str(STORIES), plan="attn66", dtype="float32", device="cpu")


def direct(engine, prefix, cont):
    """Sum of log p(cont | prefix) and greedy flag from the logits of the whole sequence."""
    logp = F.log_softmax(engine.logits(prefix + cont)[0].double(), -1)[len(prefix) - 1:-1]
    picked = logp.gather(1, torch.tensor(cont)[:, None])[:, 0]
    return float(picked.sum()), bool((logp.argmax(-1) == torch.tensor(cont)).all())


def test_score_equals_a_full_forward(engine):
    prefix = engine.tokenizer.encode("Once upon a time, there was a")
    greedy = engine.generate([prefix], max_new_tokens=4).tokens[0]
    conts = [[300], [301, 302, 303], greedy, [5]]
    got = engine.score(prefix, conts)
    for (lp, g), cont in zip(got, conts):
        ref_lp, ref_g = direct(engine, prefix, cont)
        assert lp == pytest.approx(ref_lp, rel=1e-5, abs=1e-4) and g == ref_g
    assert got[2][1] and not all(g for _, g in got)


def test_batched_groups_of_different_prefix_lengths(engine):
    """Left-padded prefixes sharing a common start (copied from the remembered prefix cache), then rows
    selected per continuation: each score equals its own full forward."""
    enc = engine.tokenizer.encode
    common = enc("Lily and Ben went to the park.")
    groups = [(common + enc(" They saw")[1:], [[290], [291, 292]]), (common[:4], [[293, 294, 295]]),
              (common + enc(" The sun")[1:], [[296]])]
    scorer = Scorer(engine)
    for _ in range(2):  # the second pass reuses the remembered common prefix
        out = scorer.score_batch([(p[:-1], [([p[-1]] + c[:-1], c) for c in conts]) for p, conts in groups])
        for (prefix, conts), scores in zip(groups, out):
            for cont, (lp, g) in zip(conts, scores):
                assert lp == pytest.approx(direct(engine, prefix, cont)[0], rel=1e-5, abs=1e-4)


def test_bad_inputs_are_user_errors(engine):
    with pytest.raises(UserError, match="non-empty"):
        engine.score([], [[1]])
    with pytest.raises(UserError, match="vocabulary"):
        engine.score([1, 2], [[engine.config.vocab_size]])


def test_partition():
    assert partition([7]) == [range(0, 1)]
    parts = partition([60, 58, 30, 29, 28, 9, 8, 8, 2])
    assert [i for r in parts for i in r] == list(range(9)) and len(parts) > 1
