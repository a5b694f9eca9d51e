import pytest
import torch

import kernels
from kernels.rotary import rope_inv_freq, rope_tables, rotary_write_kv_reference
from kernel_testing import DEVICE, ELEMENTWISE_TOL, assert_close, randn

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def _case(B, T, Hq, Hkv, D, S, cache_start, dtype, seed, fused_qkv=False, scaling=None):
    g = torch.Generator().manual_seed(seed)
    if fused_qkv:  # q, k, v as strided views of one projection output, as the runtime produces them
        qkv = randn(B, T, Hq + 2 * Hkv, D, dtype=dtype, gen=g)
        q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
    else:
        q = randn(B, T, Hq, D, dtype=dtype, gen=g)
        k = randn(B, T, Hkv, D, dtype=dtype, gen=g)
        v = randn(B, T, Hkv, D, dtype=dtype, gen=g)
    P = S + 7
    cos, sin = rope_tables(rope_inv_freq(D, 10000.0, scaling), P, device=DEVICE)
    positions = torch.randint(0, P, (B, T), generator=g).to(DEVICE)
    # Caches poisoned with NaN: only the written slots may become finite.
    caches = [torch.full((B, Hkv, S, D), float("nan"), dtype=dtype, device=DEVICE) for _ in range(2)]
    return q, k, v, cos, sin, positions, caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,cache_start", [
    (1, 1, 4, 4, 8, 0),      # stories260K-like, decode
    (2, 5, 8, 2, 8, 3),
    (2, 7, 9, 3, 64, 4),     # SmolLM2-like GQA 3
    (1, 3, 4, 1, 128, 10),   # GQA 4, head dim 128
    (3, 2, 6, 6, 96, 1),     # head dim 96: half 48 is not a power of two
    (1, 33, 8, 1, 16, 0),    # GQA 8
])
def test_rotary_write_kv_matches_reference(monkeypatch, B, T, Hq, Hkv, D, cache_start, dtype):
    S = cache_start + T + 4
    q, k, v, cos, sin, positions, (kc, vc) = _case(B, T, Hq, Hkv, D, S, cache_start, dtype, seed=B * T + D)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref = rotary_write_kv_reference(q, k, v, cos, sin, positions, kc_ref, vc_ref, cache_start)
    monkeypatch.setenv("SUBLAYER_TRITON", "1")
    q_out = kernels.rotary_write_kv(q, k, v, cos, sin, positions, kc, vc, cache_start)
    tol = ELEMENTWISE_TOL[dtype]
    assert_close(q_out, q_ref, tol, "q")
    w = slice(cache_start, cache_start + T)
    assert_close(kc[:, :, w], kc_ref[:, :, w], tol, "k cache")
    assert torch.equal(vc[:, :, w], vc_ref[:, :, w]), "v must be copied unchanged"
    outside = torch.ones(S, dtype=torch.bool)
    outside[w] = False
    assert kc[:, :, outside].isnan().all() and vc[:, :, outside].isnan().all(), "wrote outside the window"


@pytest.mark.parametrize("start_as_tensor", [False, True])
def test_rotary_fused_qkv_views_llama3_scaling(monkeypatch, start_as_tensor):
    dtype = torch.float32
    B, T, Hq, Hkv, D, S, start = 2, 3, 4, 2, 32, 9, 5
    q, k, v, cos, sin, positions, (kc, vc) = _case(B, T, Hq, Hkv, D, S, start, dtype, seed=3, fused_qkv=True,
                                                   scaling=LLAMA3_SCALING)
    assert not q.is_contiguous()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref = rotary_write_kv_reference(q, k, v, cos, sin, positions, kc_ref, vc_ref, start)
    monkeypatch.setenv("SUBLAYER_TRITON", "1")
    cs = torch.tensor([start], device=DEVICE) if start_as_tensor else start
    q_out = kernels.rotary_write_kv(q, k, v, cos, sin, positions, kc, vc, cs)
    assert_close(q_out, q_ref, 1e-5, "q")
    assert_close(kc[:, :, start:start + T], kc_ref[:, :, start:start + T], 1e-5, "k cache")
    assert torch.equal(vc[:, :, start:start + T], vc_ref[:, :, start:start + T])
