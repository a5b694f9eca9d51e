import math

import pytest
import torch

import kernels
from kernels.attention_prefill import prefill_attention_reference
from kernel_testing import ATTENTION_TOL, DEVICE, assert_close, poison_empty, randn


def _case(B, T, Hq, Hkv, D, q_start, kv_start, dtype, seed):
    """q for cache indices q_start .. q_start+T-1 and a cache valid (finite) up to q_start+T, NaN after."""
    g = torch.Generator().manual_seed(seed)
    S = q_start + T + 5
    q = randn(B, T, Hq, D, dtype=dtype, gen=g)
    k_cache = randn(B, Hkv, S, D, dtype=dtype, gen=g)
    v_cache = randn(B, Hkv, S, D, dtype=dtype, gen=g)
    k_cache[:, :, q_start + T:] = float("nan")
    v_cache[:, :, q_start + T:] = float("nan")
    kv_start = torch.tensor(kv_start, dtype=torch.int64, device=DEVICE)
    return q, k_cache, v_cache, kv_start


# (B, T, Hq, Hkv, D, q_start, kv_start per row)
CASES = [
    (1, 1, 2, 2, 8, 0, [0]),                 # one token
    (2, 9, 8, 4, 8, 0, [0, 3]),              # stories260K-like head dim 8, left padding
    (2, 17, 9, 3, 64, 0, [5, 0]),            # SmolLM2-like GQA 3
    (1, 20, 4, 1, 128, 0, [0]),              # GQA 4, head dim 128
    (2, 6, 8, 1, 16, 11, [0, 4]),            # GQA 8 on top of a cache prefix
    (2, 40, 2, 2, 32, 30, [35, 2]),          # prefix; padding reaching into this chunk
    (1, 5, 6, 3, 64, 3, [8]),                # every query of the row is padding
    (1, 257, 2, 1, 8, 0, [0]),               # long chunk, several query and key tiles
    (2, 70, 4, 2, 24, 65, [100, 7]),         # head dim 24 (not a power of two), prefix, padding
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,q_start,kv_start", CASES)
def test_prefill_attention_matches_reference(monkeypatch, B, T, Hq, Hkv, D, q_start, kv_start, dtype):
    q, kc, vc, kvs = _case(B, T, Hq, Hkv, D, q_start, kv_start, dtype, seed=T * D + q_start)
    scale = 1 / math.sqrt(D)
    ref = prefill_attention_reference(q, kc, vc, q_start, kvs, scale)
    monkeypatch.setenv("SUBLAYER_TRITON", "1")
    poison_empty(monkeypatch)
    out = kernels.prefill_attention(q, kc, vc, q_start, kvs, scale)
    assert_close(out, ref, ATTENTION_TOL[dtype])


def test_prefill_attention_strided_q(monkeypatch):
    # q as a view of a fused projection output (rows of q not contiguous).
    dtype = torch.float32
    g = torch.Generator().manual_seed(7)
    B, T, Hq, Hkv, D = 2, 5, 4, 2, 16
    q = randn(B, T, Hq + 2 * Hkv, D, dtype=dtype, gen=g)[:, :, :Hq]
    _, kc, vc, kvs = _case(B, T, Hq, Hkv, D, 2, [0, 1], dtype, seed=8)
    ref = prefill_attention_reference(q, kc, vc, 2, kvs, 0.3)
    monkeypatch.setenv("SUBLAYER_TRITON", "1")
    assert_close(kernels.prefill_attention(q, kc, vc, 2, kvs, 0.3), ref, 1e-4)
