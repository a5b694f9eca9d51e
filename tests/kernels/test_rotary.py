import pytest
import torch
from hypothesis import given, strategies as st

import kernels
from kernels.rotary import rope_inv_freq, rope_tables, rotary_write_kv_reference
from tests.kernels.kernel_testing import (
    DEVICE, DTYPES, ELEMENTWISE_TOL, RANDOM_SHAPES, assert_close, randn, triton_path,
)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def check_rotary(B, T, Hq, Hkv, D, cache_start, dtype, seed=0, fused_qkv=False, scaling=None,
                 start_as_tensor=False):
    g = torch.Generator().manual_seed(seed)
    if fused_qkv:  # q, k, v as strided views of one projection output, as the runtime produces them
        qkv = randn(B, T, (Hq + 2 * Hkv) * D, dtype=dtype, gen=g)
        q, k, v = (t.view(B, T, -1, D) for t in qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1))
        assert not q.is_contiguous()
    else:
        q = randn(B, T, Hq, D, dtype=dtype, gen=g)
        k = randn(B, T, Hkv, D, dtype=dtype, gen=g)
        v = randn(B, T, Hkv, D, dtype=dtype, gen=g)
    S = cache_start + T + 3
    P = S + 7
    cos, sin = rope_tables(rope_inv_freq(D, 10000.0, scaling), P, device=DEVICE)
    positions = torch.randint(0, P, (B, T), generator=g).to(DEVICE)
    # Caches poisoned with NaN: only the written slots may become finite.
    kc, vc = (torch.full((B, Hkv, S, D), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref = rotary_write_kv_reference(q, k, v, cos, sin, positions, kc_ref, vc_ref, cache_start)
    start = torch.tensor([cache_start], device=DEVICE) if start_as_tensor else cache_start
    with triton_path():
        q_out = kernels.rotary_write_kv(q, k, v, cos, sin, positions, kc, vc, start)
    tol = ELEMENTWISE_TOL[dtype]
    assert_close(q_out, q_ref, tol, "q")
    w = slice(cache_start, cache_start + T)
    assert_close(kc[:, :, w], kc_ref[:, :, w], tol, "k cache")
    assert torch.equal(vc[:, :, w], vc_ref[:, :, w]), "v must be copied unchanged"
    outside = torch.ones(S, dtype=torch.bool)
    outside[w] = False
    assert kc[:, :, outside].isnan().all() and vc[:, :, outside].isnan().all(), "wrote outside the window"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,Hq,Hkv,D,cache_start", [
    (1, 1, 4, 4, 8, 0),      # stories260K-like, decode
    (2, 5, 8, 2, 8, 3),
    (2, 7, 9, 3, 64, 4),     # SmolLM2-like GQA 3
    (1, 3, 4, 1, 128, 10),   # GQA 4, head dim 128
    (3, 2, 6, 6, 96, 1),     # head dim 96: half 48 is not a power of two
    (1, 33, 8, 1, 16, 0),    # GQA 8
])
def test_rotary_write_kv_matches_reference(B, T, Hq, Hkv, D, cache_start, dtype):
    check_rotary(B, T, Hq, Hkv, D, cache_start, dtype, seed=B * T + D)


@pytest.mark.parametrize("start_as_tensor", [False, True])
def test_rotary_fused_qkv_views_llama3_scaling(start_as_tensor):
    check_rotary(2, 3, 4, 2, 32, 5, torch.float32, seed=3, fused_qkv=True, scaling=LLAMA3_SCALING,
                 start_as_tensor=start_as_tensor)


@RANDOM_SHAPES
@given(B=st.integers(1, 2), T=st.integers(1, 6), Hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 3, 4, 8]),
       half=st.integers(1, 40), cache_start=st.integers(0, 9), dtype=st.sampled_from(DTYPES),
       fused=st.booleans(), seed=st.integers(0, 99))
def test_rotary_random_shapes(B, T, Hkv, group, half, cache_start, dtype, fused, seed):
    check_rotary(B, T, Hkv * group, Hkv, 2 * half, cache_start, dtype, seed, fused_qkv=fused)
