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


@pytest.fixture(scope="session")
def smollm2():
    """The default model's checkpoint directory (imported once into the cache on first use)."""
    from model.default_model import resolve_model

    return resolve_model(None)
