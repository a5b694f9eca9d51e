import pytest
import torch
from hypothesis import given, strategies as st

import kernels
from kernels.activation import swiglu_reference
from tests.kernels.kernel_testing import (
    DTYPES, ELEMENTWISE_TOL, RANDOM_SHAPES, assert_close, randn, triton_path,
)


def check_swiglu(shape, dtype, seed=0):
    gate_up = randn(*shape, dtype=dtype, gen=torch.Generator().manual_seed(seed)) * 4
    with triton_path():
        out = kernels.swiglu(gate_up)
    assert_close(out, swiglu_reference(gate_up), ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 172), (3, 2 * 1536), (2, 3, 2 * 123), (5, 2 * 1100)])
def test_swiglu_matches_reference(shape, dtype):
    check_swiglu(shape, dtype, seed=shape[-1])


@RANDOM_SHAPES
@given(rows=st.integers(1, 5), inter=st.integers(1, 1500), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 99))
def test_swiglu_random_shapes(rows, inter, dtype, seed):
    check_swiglu((rows, 2 * inter), dtype, seed)
