import contextlib

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


@pytest.mark.parametrize("cache_start", [-1, 4, 9])
def test_cache_write_outside_the_cache_raises_on_both_paths(cache_start):
    """A Python-int write index is checked on the host: IndexError from the reference and the Triton path."""
    q, k = torch.zeros(1, 2, 2, 8, device=DEVICE), torch.zeros(1, 2, 1, 8, device=DEVICE)
    cos, sin = rope_tables(rope_inv_freq(8, 10000.0), 8, device=DEVICE)
    pos = torch.zeros(1, 2, dtype=torch.long, device=DEVICE)
    caches = [torch.zeros(1, 1, 5, 8, device=DEVICE) for _ in range(2)]
    with pytest.raises(IndexError, match="outside the cache"):
        rotary_write_kv_reference(q, k, k, cos, sin, pos, *caches, cache_start)
    with triton_path(), pytest.raises(IndexError, match="outside the cache"):
        kernels.rotary_write_kv(q, k, k, cos, sin, pos, *caches, cache_start)


@pytest.mark.parametrize("cache_start", [-2, 4, 5, 100])
def test_device_write_index_outside_the_cache_writes_nothing_out_of_bounds(cache_start):
    """A device-tensor index (the CUDA-graph path) cannot be checked without a host sync: the kernel
    drops the slots outside the cache. The caches are views into a NaN-poisoned buffer with guard
    rows on both sides: those must stay NaN, and the in-cache slots of a window straddling the end
    (start 4 of 5 positions) are still written."""
    B, T, Hkv, S, D = 1, 2, 1, 5, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (randn(B, T, h, D, dtype=torch.float32, gen=g) for h in (2, Hkv, Hkv))
    cos, sin = rope_tables(rope_inv_freq(D, 10000.0), 8, device=DEVICE)
    pos = torch.arange(T, device=DEVICE)[None]
    buffers = [torch.full((B, Hkv, S + 200, D), float("nan"), device=DEVICE) for _ in range(2)]
    kc, vc = (b[:, :, 100:100 + S] for b in buffers)
    with triton_path():
        kernels.rotary_write_kv(q, k, v, cos, sin, pos, kc, vc, torch.tensor([cache_start], device=DEVICE))
    for b in buffers:
        assert b[:, :, :100].isnan().all() and b[:, :, 100 + S:].isnan().all(), "wrote outside the cache"
    inside = [i for i in range(cache_start, cache_start + T) if 0 <= i < S]
    assert torch.equal(vc[0, 0, inside], v[0, [i - cache_start for i in inside], 0])


def test_per_row_write_index():
    """A [B] index tensor (the decode step of rows at different positions): row b writes at index[b]."""
    B, T, Hq, Hkv, D, S = 3, 1, 4, 2, 16, 9
    g = torch.Generator().manual_seed(5)
    q, k, v = (randn(B, T, h, D, dtype=torch.float32, gen=g) for h in (Hq, Hkv, Hkv))
    cos, sin = rope_tables(rope_inv_freq(D, 10000.0), S, device=DEVICE)
    index = torch.tensor([0, 7, 3], device=DEVICE)
    positions = index[:, None] - 0
    outs = []
    for path in (contextlib.nullcontext, triton_path):
        kc, vc = (torch.full((B, Hkv, S, D), float("nan"), device=DEVICE) for _ in range(2))
        with path():
            q_out = (kernels.rotary_write_kv if path is triton_path else rotary_write_kv_reference)(
                q, k, v, cos, sin, positions, kc, vc, index)
        outs.append((q_out, kc, vc))
        for b, i in enumerate(index.tolist()):
            assert torch.equal(vc[b, :, i], v[b, 0]) and torch.isfinite(kc[b, :, i]).all()
            assert kc[b, :, torch.arange(S) != i].isnan().all(), f"row {b} wrote outside index {i}"
    (q_ref, kc_ref, _), (q_tri, kc_tri, _) = outs
    assert_close(q_tri, q_ref, 1e-5, "q")
    assert_close(kc_tri.nan_to_num(0.0), kc_ref.nan_to_num(0.0), 1e-5, "k cache")
