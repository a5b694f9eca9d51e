"""Helpers shared by the kernel tests (a distinct name so it cannot clash with other test dirs)."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative-error bounds (||a - b|| / ||b||) per dtype: element-wise kernels and attention.
ELEMENTWISE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ATTENTION_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


def randn(*shape, dtype, seed=None, gen=None):
    g = gen if gen is not None else torch.Generator().manual_seed(seed or 0)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype=dtype, device=DEVICE)


def poison_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled floating tensors, so that an output element a
    kernel forgets to write shows up as NaN instead of as whatever the allocator left there."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(empty_like(*a, **k)))
