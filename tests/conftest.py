"""Shared test setup: on machines without CUDA, run Triton kernels under the interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` runs, i.e. when ``kernels`` is imported, so it
has to be set here, before any test module imports it. (Tests that want the Triton path on CPU set
``SUBLAYER_TRITON=1`` themselves.)
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One test session compiles the decode step for dozens of tiny models, batch sizes and dtypes; a
# user's process holds a few. Past dynamo's recompile limit a fullgraph compile fails hard, so the
# session gets room for all of them (runtime.fast_decode itself allows 64 variants per function).
torch._dynamo.config.recompile_limit = 1024
torch._dynamo.config.accumulated_recompile_limit = 8192


@pytest.fixture(scope="session")
def smollm2():
    """The default model's checkpoint directory (imported once into the cache on first use)."""
    from model.default_model import resolve_model

    return resolve_model(None)
