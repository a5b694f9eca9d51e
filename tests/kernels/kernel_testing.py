"""Helpers shared by the kernel tests (imported as tests.kernels.kernel_testing; the repository root
is on the path through pyproject's pytest `pythonpath`)."""

import contextlib

import pytest
import torch
from hypothesis import settings

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The interpreter mishandles bfloat16 (NaN/inf even in element-wise kernels), so bfloat16 is only
# tested on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

# Relative-error bounds (||a - b|| / ||b||) per dtype: element-wise kernels and attention.
ELEMENTWISE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ATTENTION_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# Random-shape tests: few examples (the interpreter is slow), reproducible.
RANDOM_SHAPES = settings(max_examples=12, deadline=None, derandomize=True, database=None)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


def randn(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype=dtype, device=DEVICE)


@contextlib.contextmanager
def triton_path():
    """Run the dispatch's Triton path (CUDA tensors take it anyway; on CPU, SUBLAYER_TRITON=1 under the
    interpreter), with torch.empty / empty_like returning NaN-filled floating tensors, so that an
    output element a kernel forgets to write shows up as NaN instead of as whatever the allocator
    left there."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with pytest.MonkeyPatch.context() as mp:
        if DEVICE == "cpu":  # never with CUDA present: compiled Triton must not get CPU tensors
            mp.setenv("SUBLAYER_TRITON", "1")
        mp.setattr(torch, "empty", lambda *a, **k: nan_fill(empty(*a, **k)))
        mp.setattr(torch, "empty_like", lambda *a, **k: nan_fill(empty_like(*a, **k)))
        yield
