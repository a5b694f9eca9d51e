"""Which path a step takes: ``decode_step`` is the only way into the compiled step / CUDA graph; a graph
is captured once for the engine's own cache and never per new cache (a CPU stand-in for torch.cuda
counts captures); no Engine <-> graph reference cycle; ``dtype="auto"`` on a card without bf16."""

import contextlib
import gc
import weakref

import pytest
import torch

import runtime
from bench.hf_reference import STORIES
from runtime import fast_decode
from runtime.engine import resolve_dtype


def compiled_calls():
    return sum(n for k, n in fast_decode.CALLS.items() if k.startswith("compiled"))


def test_scoring_never_takes_the_fast_path():
    """logits of one token, forward of one-token continuations and score() run eagerly; only
    decode_step (generation) calls the compiled step."""
    engine = runtime.load(str(STORIES), dtype="float32", device="cpu")
    assert engine.decode_mode == "compiled"
    before = compiled_calls()
    engine.logits([5])
    engine.logits([[5], [6]])
    cache = engine.new_cache(2, 8)
    kv0 = torch.zeros(2, dtype=torch.int32)
    engine.forward(torch.tensor([[5, 6, 7], [8, 9, 10]]), cache, 0, kv0, torch.arange(3)[None].expand(2, 3))
    engine.forward(torch.tensor([[11], [12]]), cache, 3, kv0, torch.tensor([[3], [3]]))
    engine.score([5, 6, 7], [[8], [9, 10]])
    assert compiled_calls() == before
    engine.generate("Once", max_new_tokens=3)
    L = len(engine.schedule.steps) + 1
    assert compiled_calls() == before + 2 * L  # two decode steps, each every layer and the head


class StandInCuda:
    """torch.cuda's graph API on CPU: counts captures and replays (a replay recomputes nothing, so only
    counts and lifetimes are checked with it)."""

    def __init__(self):
        self.captures = 0
        self.devices = []

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    class CUDAGraph:
        def replay(self):
            pass

    def current_stream(self, device=None):
        return self.Stream()

    def stream(self, s):
        return contextlib.nullcontext()

    def device(self, d):
        self.devices.append(d)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def graph(self, g):
        self.captures += 1
        yield


def graph_engine(**kw):
    engine = runtime.load(str(STORIES), dtype="float32", device="cpu", **kw)
    engine.decode_mode, engine.graph_backend = "graph", StandInCuda()
    return engine


def test_graph_captured_once_for_the_engines_own_cache_only():
    engine = graph_engine(max_seq_len=64)
    cuda = engine.graph_backend
    for _ in range(3):  # the engine's own cache persists (max_seq_len set): one capture serves every call
        engine.generate("Once upon a time", max_new_tokens=5)
    assert cuda.captures == 1 and fast_decode.CALLS["graph replay"] >= 12
    assert all(d == engine.device for d in cuda.devices)  # launches on the engine's device
    for t in range(10):  # scoring one-token inputs, and decode steps over other caches: no capture
        engine.logits([t + 3])
        cache = engine.new_cache(1, 8)
        engine.decode_step(torch.tensor([[t + 3]]), cache, torch.tensor([2]))
    assert cuda.captures == 1


def test_graph_recaptured_only_when_the_own_cache_changes():
    engine = graph_engine()  # no max_seq_len: the own cache follows prompt + new tokens
    cuda = engine.graph_backend
    engine.generate("Once upon a time", max_new_tokens=5)
    engine.generate("Once upon a time", max_new_tokens=5)
    assert cuda.captures == 1
    engine.generate("Once upon a time", max_new_tokens=9)
    assert cuda.captures == 2


@pytest.mark.parametrize("mode", ["graph", "compiled"])
def test_del_engine_frees_it_without_the_cycle_collector(mode):
    engine = graph_engine() if mode == "graph" else runtime.load(str(STORIES), dtype="float32", device="cpu")
    engine.generate("Once upon a time", max_new_tokens=4)
    if mode == "graph":
        assert engine._graph is not None
    ref = weakref.ref(engine)
    gc.disable()
    try:
        del engine
        assert ref() is None
    finally:
        gc.enable()


def test_auto_dtype_falls_back_to_float16_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_dtype("auto", torch.device("cuda", 1)) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
