import pytest
import torch
from hypothesis import given, strategies as st

import kernels
from kernels.rmsnorm import add_rmsnorm_config, add_rmsnorm_reference
from tests.kernels.kernel_testing import (
    DTYPES, ELEMENTWISE_TOL, RANDOM_SHAPES, assert_close, randn, triton_path,
)


def check_add_rmsnorm(shape, dtype, with_x, seed=0, eps=1e-5):
    g = torch.Generator().manual_seed(seed)
    H = shape[-1]
    x = randn(*shape, dtype=dtype, gen=g) if with_x else None
    residual = randn(*shape, dtype=dtype, gen=g) * 3
    weight = 1 + 0.1 * randn(H, dtype=dtype, gen=g)
    r_ref, y_ref = add_rmsnorm_reference(x, residual, weight, eps)
    res_before = residual.clone()
    with triton_path():
        r, y = kernels.add_rmsnorm(x, residual, weight, eps)
    tol = ELEMENTWISE_TOL[dtype]
    assert_close(r, r_ref, tol, "residual")
    assert_close(y, y_ref, tol, "normed")
    assert torch.equal(residual, res_before), "the input residual must not be modified"
    if not with_x:
        assert r is residual


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 288), (2, 5, 576), (7, 123), (1, 1, 4096)])
@pytest.mark.parametrize("with_x", [True, False])
def test_add_rmsnorm_matches_reference(shape, dtype, with_x):
    check_add_rmsnorm(shape, dtype, with_x, seed=sum(shape))


@RANDOM_SHAPES
@given(rows=st.integers(1, 6), hidden=st.integers(1, 700), dtype=st.sampled_from(DTYPES), with_x=st.booleans(),
       seed=st.integers(0, 99))
def test_add_rmsnorm_random_shapes(rows, hidden, dtype, with_x, seed):
    check_add_rmsnorm((rows, hidden), dtype, with_x, seed)


def test_add_rmsnorm_strided_rows():
    # Rows that are not contiguous with each other (slices of a wider buffer).
    g = torch.Generator().manual_seed(1)
    buf = randn(4, 200, dtype=torch.float32, gen=g)
    x, residual = buf[:, :96], buf[:, 100:196]
    weight = randn(96, dtype=torch.float32, gen=g)
    with triton_path():
        out = kernels.add_rmsnorm(x, residual, weight, 1e-6)
    for o, ref in zip(out, add_rmsnorm_reference(x, residual, weight, 1e-6)):
        assert_close(o, ref, 1e-5)


def test_config_is_pure_and_bounded():
    assert add_rmsnorm_config(4096, torch.bfloat16) == {"BLOCK_H": 4096, "num_warps": 8}
    assert add_rmsnorm_config(123, torch.float32) == {"BLOCK_H": 128, "num_warps": 1}
    with pytest.raises(ValueError):
        add_rmsnorm_config(40000, torch.float32)
