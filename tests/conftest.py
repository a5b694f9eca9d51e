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


def pytest_addoption(parser):
    parser.addoption("--cold-start", choices=("jit", "build"), default="jit",
                     help="what a compiled CPU decode step missing from the compile cache does "
                          "(runtime.fast_decode.cold_start): jit (default) compiles it in-process; build runs "
                          "every compiled-step test through AOTInductor entries of the compile cache, built "
                          "once per model shape under $SUBLAYER_CACHE (slow on a cold cache)")


@pytest.fixture(autouse=True, scope="session")
def _cold_start(request):
    from runtime import fast_decode

    fast_decode.cold_start = request.config.getoption("--cold-start")


@pytest.fixture(scope="session")
def smollm2():
    """The default model's checkpoint directory (imported once into the cache on first use)."""
    from model.default_model import resolve_model

    return resolve_model(None)


def pytest_terminal_summary(terminalreporter, config):
    """Under ``--cold-start build``: how the compiled decode steps ran (cache entries or in-process)."""
    if config.getoption("--cold-start") != "build":
        return
    from runtime.fast_decode import CALLS

    cached = sum(n for k, n in CALLS.items() if k.startswith("compiled") and not k.endswith("(jit)"))
    jit = sum(n for k, n in CALLS.items() if k.endswith("(jit)"))
    terminalreporter.write_line(f"compiled decode steps: {cached} calls through compile-cache entries "
                                f"({CALLS['cache build']} built, {CALLS['cache hit']} loaded), {jit} compiled "
                                f"in-process (calls the cache cannot describe, e.g. caches under its size floor)")
