"""The continuous-batching scheduler without HTTP: rows at different positions, chunked prefill
interleaved with decode steps, per-row sampling, the KV pool's size under a plan."""

import queue
import time

import pytest

import runtime
from model.errors import UserError
from runtime.scheduler import QueueFull, SamplingParams, Scheduler, Sequence, pool_slots

STORIES = "../shared/models/stories260K"


@pytest.fixture(scope="module")
def engine():
    return runtime.load(STORIES, compile=False, show_progress=False)


def run_all(scheduler, prompts, params):
    """Submit every prompt at once; wait for all; (text, finish_reason, tokens) per prompt."""
    events = queue.Queue()
    seqs = [Sequence(ids, p, lambda e, i=i: events.put((i, e))) for i, (ids, p) in enumerate(zip(prompts, params))]
    scheduler.submit(seqs)
    texts, reasons = [""] * len(seqs), [None] * len(seqs)
    left = len(seqs)
    deadline = time.time() + 60
    while left:
        i, (what, value) = events.get(timeout=max(0.1, deadline - time.time()))
        assert what != "error", value
        if what == "text":
            texts[i] += value
        else:
            reasons[i], left = value, left - 1
    return texts, reasons, [s.out for s in seqs]


def test_plan_holds_more_rows(engine):
    """Same bytes: a plan keeping 3 of 5 attention sublayers holds 5/3 the rows of full."""
    row = engine.kv_bytes(128, 1)
    assert pool_slots(engine, 6 * row, 128, 100) == 6
    assert pool_slots(engine, 6 * row, 128, 4) == 4  # capped by --max-batch
    dropped = engine.with_plan({"version": 1, "name": "a2", "drop": {"attention": [1, 3]}})
    assert pool_slots(dropped, 6 * row, 128, 100) == 10
    with pytest.raises(UserError, match="--kv-memory: .* hold no sequence"):
        pool_slots(engine, row - 1, 128, 4)


def test_batched_rows_match_generate(engine):
    """Prompts of different lengths, joined at different steps (a 3-token prefill chunk interleaves
    the long prompts with decode steps), decode greedily to what Engine.generate gives each alone; a
    seeded sampled row repeats itself."""
    tok = engine.tokenizer
    texts = ["Once upon a time", "The cat", "Lily and Tom went to the park to play with a big red ball and",
             "One day, a little bird"]
    lengths = [12, 5, 9, 16]
    want = [engine.generate(t, n) for t, n in zip(texts, lengths)]
    sched = Scheduler(engine, slots=3, max_seq_len=128, max_queue=8, prefill_chunk=3)
    sched.start()
    try:
        prompts = [tok.encode(t) for t in texts]
        got, reasons, outs = run_all(sched, prompts, [SamplingParams(max_tokens=n, temperature=0) for n in lengths])
        assert got == [w.texts[0] for w in want]
        assert outs == [w.tokens[0] for w in want]
        assert reasons == ["stop" if w.tokens[0][-1] in tok.eos_ids else "length" for w in want]
        assert sched.peak_rows == 3 and sched.counts() == (0, 0)
        sampled = [SamplingParams(max_tokens=6, temperature=0.9, top_k=20, seed=7)] * 2
        a, _, _ = run_all(sched, prompts[:2], [sampled[0], SamplingParams(max_tokens=3, temperature=0)])
        b, _, _ = run_all(sched, prompts[:1], sampled[:1])
        assert a[0] == b[0]
    finally:
        sched.stop()


def test_stop_strings_and_queue_bound(engine):
    tok = engine.tokenizer
    full = engine.generate("Once upon a time", 20).texts[0]
    stop = full[8:11]
    sched = Scheduler(engine, slots=1, max_seq_len=64, max_queue=1)
    with pytest.raises(QueueFull):
        sched.submit([Sequence([1], SamplingParams(), print)] * 2)
    sched.start()
    try:
        got, reasons, _ = run_all(sched, [tok.encode("Once upon a time")], [SamplingParams(20, 0, stop=[stop])])
        assert got == [full[:full.find(stop)]] and reasons == ["stop"]
    finally:
        sched.stop()


def test_compiled_step_rows_match_eager(engine):
    """The compiled decode step (what the server runs by default) over a pool of rows at different
    positions gives the eager engine's greedy tokens."""
    compiled = runtime.load(STORIES, show_progress=False)
    assert compiled.decode_mode == "compiled"
    tok = engine.tokenizer
    texts, lengths = ["Once upon a time", "The dog ran"], [10, 6]
    want = [engine.generate(t, n).tokens[0] for t, n in zip(texts, lengths)]
    sched = Scheduler(compiled, slots=2, max_seq_len=64)
    sched.start()
    try:
        _, _, outs = run_all(sched, [tok.encode(t) for t in texts],
                             [SamplingParams(max_tokens=n, temperature=0) for n in lengths])
    finally:
        sched.stop()
    assert outs == want
