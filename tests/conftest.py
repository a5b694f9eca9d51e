"""Shared test setup: make the repository importable and, on machines without CUDA, choose the
Triton interpreter.

``TRITON_INTERPRET`` is read when ``@triton.jit`` runs, i.e. when ``kernels`` is imported, so it
has to be set here, before any test module imports it.
"""

import os
import sys
from pathlib import Path

import torch

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # plain `pytest` (not `python -m pytest`) does not put the repo on the path
    sys.path.insert(0, ROOT)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; skipped unless --run-slow is given")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    import pytest

    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
