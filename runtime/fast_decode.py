"""The decode step made fast: compiled with inductor on CPU, captured as a CUDA graph on GPU.

Both take the step functions of ``runtime.step`` as they are; nothing here knows the model. ``CALLS``
counts compiled-step calls, graph captures and replays (tests use it to prove which path ran).
"""

import collections
import functools
import threading

import torch

from runtime import step

CALLS = collections.Counter()


class Steps(collections.namedtuple("Steps", "attention mlp head")):
    """The three step functions a decode step runs (see ``runtime.step``)."""


EAGER = Steps(step.attention_step, step.mlp_step, step.head_step)


# The step functions with the multiply-reduce projection; one Python function each, so that each has
# its own code object (dynamo keys its compiled variants on it).
def _attention(*args, **kwargs):
    return step.attention_step(*args, **kwargs, project=step.multiply_reduce)


def _mlp(*args, **kwargs):
    return step.mlp_step(*args, **kwargs, project=step.multiply_reduce)


def _head(*args, **kwargs):
    return step.head_step(*args, **kwargs, project=step.multiply_reduce)


_thread = threading.local()


@functools.cache
def compiled_steps() -> Steps:
    """The step functions with the multiply-reduce projection, each compiled once per process: the
    compiled code is shared by every layer, plan and engine of the same shapes (the cache length is a
    dynamic dimension, so a new length does not recompile; a new model, batch size or dtype compiles a
    variant). A process may hold up to 64 variants per function (dynamo's default of 8 is too few for
    a test session that loads many small models; dynamo's config is per thread, so each thread that
    steps, e.g. the server's scheduler, raises its own limit)."""

    def compiled(name, fn):
        run = torch.compile(fn, fullgraph=True, dynamic=None)

        def counted(*args, **kwargs):
            CALLS[f"compiled {name}"] += 1
            if not getattr(_thread, "limit_raised", False):
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                _thread.limit_raised = True
            return run(*args, **kwargs)

        return counted

    return Steps(compiled("attention", _attention), compiled("mlp", _mlp), compiled("head", _head))


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
