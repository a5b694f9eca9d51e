import pytest
import torch

import kernels
from kernels.swiglu import swiglu_reference
from kernel_testing import ELEMENTWISE_TOL, assert_close, randn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2 * 172), (3, 2 * 1536), (2, 3, 2 * 123), (5, 2 * 1100)])
def test_swiglu_matches_reference(monkeypatch, shape, dtype):
    monkeypatch.setenv("SUBLAYER_TRITON", "1")
    gate_up = randn(*shape, dtype=dtype, seed=shape[-1]) * 4
    assert_close(kernels.swiglu(gate_up), swiglu_reference(gate_up), ELEMENTWISE_TOL[dtype])
