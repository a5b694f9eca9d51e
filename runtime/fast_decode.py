"""The decode step made fast: compiled with inductor on CPU, captured as a CUDA graph on GPU.

Both take the step functions of ``runtime.step`` as they are; nothing here knows the model. On CPU the
compiled steps come from the on-disk compile cache (``runtime.compile_cache``). ``CALLS`` counts
compiled-step calls, eager calls while a cache entry is cold, cache hits and builds, graph captures
and replays (tests use it to prove which path ran).
"""

import collections
import functools
import queue
import sys
import threading
import time
import weakref

import torch

from model.quant import QuantWeight
from runtime import step

CALLS = collections.Counter()


class Steps(collections.namedtuple("Steps", "attention mlp head")):
    """The three step functions a decode step runs (see ``runtime.step``)."""


EAGER = Steps(step.attention_step, step.mlp_step, step.head_step)


# The step functions with the multiply-reduce projection (attention: ``_attention_over_cache``); one
# Python function each, so that each has its own code object (dynamo keys its compiled variants on it).
def _mlp(*args, **kwargs):
    return step.mlp_step(*args, **kwargs, project=step.multiply_reduce)


def _head(*args, **kwargs):
    return step.head_step(*args, **kwargs, project=step.multiply_reduce)


_thread = threading.local()


def _jit(name, fn, adapt=None):
    """``fn`` compiled in this process with ``torch.compile`` (the fallback where the compile cache
    cannot serve a call). A process may hold up to 64 variants per function (dynamo's default of 8 is
    too few for a test session that loads many small models; dynamo's config is per thread, so each
    thread that steps, e.g. the server's scheduler, raises its own limit)."""
    run = None

    def counted(*args, **kwargs):
        nonlocal run
        if run is None:  # torch.compile imports dynamo and inductor (seconds): only when needed
            run = torch.compile(fn, fullgraph=True, dynamic=None)
        CALLS[f"compiled {name} (jit)"] += 1
        if adapt is not None:  # the attention step: one compiled step for every cache size and length
            args = adapt(args)
            for t, dim in ((args[0], 2), (args[1], 2), (args[2], 0)):
                torch._dynamo.maybe_mark_dynamic(t, dim)
        if not getattr(_thread, "limit_raised", False):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            _thread.limit_raised = True
        return run(*args, **kwargs)

    return counted


# What a step missing from the compile cache does (``cold_start``): "jit" compiles it in this process
# with torch.compile and stores nothing (the Python API's default: a test session meets dozens of tiny
# model shapes, each as fast to compile in-process as it is slow to build ahead of time); "build"
# builds the entry now and uses it (``python -m runtime.compile_cache``); "eager" runs the eager step
# and builds nothing (a short CLI job); "background" runs the eager step while a thread builds the
# entry, then switches to it (a long CLI job).
COLD_STARTS = ("jit", "build", "eager", "background")
cold_start = "jit"
BUILD_SECONDS = collections.Counter()  # seconds spent building entries, per step name


def _attention_over_cache(k_full, v_full, length, pending, x, norm, qkv, o, cos, sin, positions, index, kv_start,
                          heads, kv_heads, eps, scale):
    """The attention step over the whole caches [B, Hkv, S, D], attending over the first
    ``length.shape[0]`` positions (the new K/V written into the whole cache: compiled, a write through
    a cut view would copy the cut; and the cut's strides depend on S, which an exported step cannot
    take as an input)."""
    L = length.shape[0]
    torch._check(L <= k_full.shape[2])
    return step.attention_step(pending, x, norm, qkv, o, k_full, v_full, cos, sin, positions, index, kv_start,
                               heads, kv_heads, eps, scale, project=step.multiply_reduce, length=L)


_markers = {}


def _whole(c: torch.Tensor) -> torch.Tensor:
    """The whole cache [B, Hkv, S, D] a cut view [B, Hkv, L, D] of a contiguous cache comes from."""
    B, H, L, D = c.shape
    s = c.stride()
    S = s[1] // D if D else 0
    if s[3] == 1 and s[2] == D and s[1] == S * D and s[0] == H * S * D and S >= L:
        return c.as_strided((B, H, S, D), s)
    return c  # not a cut of a contiguous cache: describe() refuses it and the step runs on the JIT path


def _attention_args(args):
    kc, vc = args[5], args[6]
    L = kc.shape[2]
    marker = _markers.get(L)
    if marker is None:
        marker = _markers[L] = torch.empty(L, 0)
    return (_whole(kc), _whole(vc), marker) + args[:5] + args[7:]


def _tensors(args) -> list:
    """The tensor leaves of ``args`` in pytree order (arguments are tensors or tuples of them)."""
    return [t for a in args for t in (a if isinstance(a, tuple) else (a,)) if isinstance(t, torch.Tensor)]


class CachedStep:
    """One step function served from the compile cache (``runtime.compile_cache``): each call structure
    is looked up once per process (key from the flattened arguments), loaded or built, and later calls
    of the same layer weight, input shape and thread count go straight to the loaded code.

    ``exported(*adapt(args))`` is what is compiled; ``dynamic`` its dynamic dimensions; ``eager`` the
    step as it is (the cold-start and fallback path) and ``jit`` the ``torch.compile`` fallback."""

    def __init__(self, name, exported, dynamic, adapt, eager, jit):
        self.name, self.exported, self.adapt, self.eager, self.jit = name, exported, adapt, eager, jit
        # batch 1 has its own code (one-row projections are multiply-reduce loops); 2 rows and more share one
        self.dynamic = {1: {p: {d: n for d, n in dims.items() if n != "B"} for p, dims in dynamic.items()},
                        2: dynamic}
        self._fast = {}  # (id(first weight), x shape, x dtype, threads) -> (weakref, run(args))
        self._entries = {}  # entry path -> run(args): one loaded package per process, shared by the layers
        self._pending = {}  # fast key -> entry path being built in the background
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        if any(v is not None for v in kwargs.values()):  # prefill_start: not a decode step
            return self.eager(*args, **kwargs)
        # Keyed on the step's first weight (a layer's; a QuantWeight by its data), which fixes the call's
        # structure: engines may share other tensors (norms) while their weights differ in kind.
        x, anchor = args[1], args[3]
        if isinstance(anchor, QuantWeight):
            anchor = anchor.data
        fk = (id(anchor), x.shape, x.dtype, torch.get_num_threads())
        hit = self._fast.get(fk)
        if hit is None or hit[0]() is not anchor:
            hit = self._resolve(fk, anchor, args)
        return hit[1](args)

    def _aot(self, runner):
        def run(args):
            CALLS[f"compiled {self.name}"] += 1
            return runner(_tensors(self.adapt(args)))
        return run

    def _eager(self, args):
        CALLS[f"eager {self.name}"] += 1
        return self.eager(*args)

    def _resolve(self, fk, anchor, args):
        from runtime import compile_cache

        with self._lock:
            xargs = self.adapt(args)
            try:
                dynamic = self.dynamic[min(args[1].shape[0], 2)]
                key, tensors = compile_cache.describe(xargs, dynamic, _SIZES)
                if [id(t) for t in tensors] != [id(t) for t in _tensors(xargs)]:
                    raise ValueError("nested arguments")
            except compile_cache.TooSmall:  # e.g. a cache of 2 positions: this call only
                return None, lambda a: self.jit(*a)
            except ValueError:
                run = lambda a: self.jit(*a)  # noqa: E731
            else:
                path, full = compile_cache.entry_path(self.name, key)
                run = self._entries.get(path)
                runner = None if run is not None else compile_cache.load(path, full)
                if run is not None:
                    pass
                elif runner is not None:
                    CALLS["cache hit"] += 1
                    run = self._entries[path] = self._aot(runner)
                elif cold_start == "build":
                    run = self._entries[path] = self._build(path, full, xargs, dynamic)
                elif cold_start == "jit":
                    CALLS["cold jit"] += 1
                    run = lambda a: self.jit(*a)  # noqa: E731
                else:
                    CALLS["cold eager"] += 1
                    run = self._eager
                    if cold_start == "background":
                        if path not in self._pending.values():
                            _background(lambda: self._finish(path, full, xargs, dynamic))
                        self._pending[fk] = path
            entry = self._fast[fk] = (weakref.ref(anchor), run)
            return entry

    def _build(self, path, full, xargs, dynamic):
        from runtime import compile_cache

        t0 = time.perf_counter()
        try:
            runner = compile_cache.build(path, full, self.exported, xargs, dynamic, _SIZES)
        except Exception as e:  # the cache must never fail a run: compile in-process instead
            first = str(e).splitlines()[0] if str(e) else ""
            print(f"compile cache: cannot build {self.name} ({type(e).__name__}: {first}); compiling it in this "
                  f"process instead", file=sys.stderr, flush=True)
            return lambda a: self.jit(*a)
        BUILD_SECONDS[self.name] += time.perf_counter() - t0
        CALLS["cache build"] += 1
        return self._aot(runner)

    def _finish(self, path, full, xargs, dynamic):
        run = self._build(path, full, xargs, dynamic)
        with self._lock:
            self._entries[path] = run
            for k, (ref, _) in list(self._fast.items()):  # every layer that ran eagerly for this entry
                if self._pending.get(k) == path:
                    self._fast[k] = (ref, run)
                    del self._pending[k]


_jobs = None


def _background(job):
    """Run ``job`` on the one background build thread (builds run one at a time, in order)."""
    global _jobs
    if _jobs is None:
        _jobs = queue.Queue()

        def work():
            while True:
                _jobs.get()()
                _jobs.task_done()

        threading.Thread(target=work, name="sublayer-compile", daemon=True).start()
    _jobs.put(job)


def background_builds_pending() -> bool:
    return _jobs is not None and _jobs.unfinished_tasks > 0


@functools.cache
def compiled_steps() -> Steps:
    """The CPU decode step functions with the multiply-reduce projection, served from the compile cache
    (``CachedStep``): the compiled code is shared by every layer, plan and engine of the same shapes
    (the cache length is a dynamic dimension, so a new length does not recompile; a new model, batch
    size or dtype is another entry)."""
    same = lambda a: a  # noqa: E731
    rows = {0: {0: "B"}, 1: {0: "B"}}  # pending, x
    cache = {0: "B", 2: "S"}
    # _attention_args order: k, v, length, pending, x, norm, qkv, o, cos, sin, positions, index, kv_start, ...
    attention = {0: cache, 1: cache, 2: {0: "L"}, 3: {0: "B"}, 4: {0: "B"}, 10: {0: "B"}, 11: {0: "B"}, 12: {0: "B"}}
    return Steps(
        CachedStep("attention", _attention_over_cache, attention, _attention_args, step.attention_step,
                   _jit("attention", _attention_over_cache, adapt=_attention_args)),
        CachedStep("mlp", _mlp, rows, same, step.mlp_step, _jit("mlp", _mlp)),
        CachedStep("head", _head, rows, same, step.head_step, _jit("head", _head)))


# The dynamic dimensions: (size while exporting, smallest size the compiled step takes; a call below
# it runs on the JIT path). The export of SmolLM2's bfloat16 attention guards on S >= 3.
_SIZES = {"B": (3, 2), "S": (16, 3), "L": (8, 2)}


def warm(engine, batch: int = 1):
    """Load or build (now) every compiled step ``engine`` decodes with at ``batch`` rows."""
    global cold_start
    saved, cold_start = cold_start, "build"
    try:
        cache = engine.new_cache(batch, 4)
        engine.decode_step(torch.zeros(batch, 1, dtype=torch.long), cache, torch.ones(batch, dtype=torch.long))
    finally:
        cold_start = saved


class DecodeGraph:
    """A decode step (one token per row, over one KV cache) captured as a CUDA graph (gpt-fast's
    ``decode_one_token``): a call copies the tokens, cache index and kv_start into static device
    buffers and replays every kernel launch of the step at once. The kernels read the cache index and
    the valid key range from device memory, so one capture serves every position.

    ``run_step``: a callable returning the step function ``f(tokens, cache, index, kv_start) ->
    logits`` or None once its owner is gone (a ``weakref.WeakMethod``: the engine owns this graph, so
    a strong reference back would keep weights, cache and graph pool alive until the cycle collector
    runs). ``backend``: ``torch.cuda`` (a stand-in in tests)."""

    def __init__(self, run_step, cache, batch: int, device: torch.device, backend=torch.cuda):
        self.run_step, self.cache, self.device, self.backend = run_step, cache, device, backend
        self.batch = batch
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.index = torch.zeros(batch, dtype=torch.long, device=device)
        self.kv_start = torch.zeros(batch, dtype=torch.int32, device=device)
        self.graph, self.logits = None, None

    def _step(self):
        return self.run_step()(self.tokens, self.cache, self.index, self.kv_start)

    def __call__(self, tokens, index, kv_start):
        cuda = self.backend
        with cuda.device(self.device):  # cuda:N: the graph's streams and launches on N
            self.tokens.copy_(tokens)
            self.index.copy_(index)
            self.kv_start.copy_(kv_start)
            if self.graph is None:
                # Warm-up on a side stream (Triton JIT, allocator), then capture. Both run with the real
                # inputs, so the K/V they write at the index are the values this step writes anyway.
                side = cuda.Stream(device=self.device)
                side.wait_stream(cuda.current_stream(self.device))
                with cuda.stream(side):
                    self._step()
                cuda.current_stream(self.device).wait_stream(side)
                self.graph = cuda.CUDAGraph()
                with cuda.graph(self.graph):
                    self.logits = self._step()
                CALLS["graph capture"] += 1
            self.graph.replay()
            CALLS["graph replay"] += 1
            return self.logits.clone()  # the static output buffer is overwritten by the next replay
