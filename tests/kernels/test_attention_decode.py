import math

import pytest
import torch

import kernels
from kernels.attention_decode import decode_attention_reference, decode_config
from kernel_testing import ATTENTION_TOL, DEVICE, assert_close, poison_empty, randn


def _case(B, Hq, Hkv, D, S, kv_start, kv_end, dtype, seed):
    """Returns q, the caches NaN outside each row's [kv_start, kv_end) (for the kernel), the same
    caches with zeros there (for the reference: SDPA turns masked NaN into NaN), kv_start, kv_end."""
    g = torch.Generator().manual_seed(seed)
    q = randn(B, Hq, D, dtype=dtype, gen=g)
    k_cache = randn(B, Hkv, S, D, dtype=dtype, gen=g)
    v_cache = randn(B, Hkv, S, D, dtype=dtype, gen=g)
    for b in range(B):
        for c in (k_cache, v_cache):
            c[b, :, :kv_start[b]] = float("nan")
            c[b, :, kv_end[b]:] = float("nan")
    kvs = torch.tensor(kv_start, dtype=torch.int64, device=DEVICE)
    kve = torch.tensor(kv_end, dtype=torch.int64, device=DEVICE)
    return q, k_cache, v_cache, k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0), kvs, kve


# (B, Hq, Hkv, D, S, kv_start per row, kv_end per row)
CASES = [
    (1, 4, 4, 8, 8, [0], [1]),                    # first token, head dim 8
    (2, 8, 4, 8, 40, [0, 5], [33, 33]),           # stories260K-like, left padding
    (2, 9, 3, 64, 70, [3, 0], [70, 41]),          # SmolLM2-like GQA 3, a row ending at S
    (1, 8, 2, 128, 100, [0], [97]),               # GQA 4, head dim 128
    (2, 8, 1, 16, 300, [0, 250], [257, 299]),     # GQA 8, several slices, padding spans slices
    (1, 2, 2, 24, 65, [64], [65]),                # head dim 24; the only key is the cache's last
    (2, 128, 128, 8, 200, [1, 0], [190, 130]),    # many KV heads: one slice, several blocks per slice
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,D,S,kv_start,kv_end", CASES)
def test_decode_attention_matches_reference(monkeypatch, B, Hq, Hkv, D, S, kv_start, kv_end, dtype):
    q, kc, vc, kc0, vc0, kvs, kve = _case(B, Hq, Hkv, D, S, kv_start, kv_end, dtype, seed=S + D)
    scale = 1 / math.sqrt(D)
    ref = decode_attention_reference(q, kc0, vc0, kvs, kve, scale)
    monkeypatch.setenv("SUBLAYER_TRITON", "1")
    poison_empty(monkeypatch)
    out = kernels.decode_attention(q, kc, vc, kvs, kve, scale)
    assert_close(out, ref, ATTENTION_TOL[dtype])


def test_decode_config_splits_static_cache():
    # Llama-3-8B, batch 1, 4096 positions: 32 slices of 128 keys (2 blocks each) per KV head.
    cfg = decode_config(1, 8, 4, 4096, 128, torch.bfloat16)
    assert (cfg["NUM_SPLITS"], cfg["SPLIT_LEN"], cfg["BLOCK_G"], cfg["BLOCK_D"]) == (32, 128, 16, 128)
    for B, Hkv, S in [(1, 1, 1), (3, 3, 77), (64, 32, 4096), (1, 8, 100000)]:
        cfg = decode_config(B, Hkv, 1, S, 64, torch.float16)
        assert cfg["SPLIT_LEN"] % cfg["BLOCK_N"] == 0
        assert (cfg["NUM_SPLITS"] - 1) * cfg["SPLIT_LEN"] < S <= cfg["NUM_SPLITS"] * cfg["SPLIT_LEN"]
