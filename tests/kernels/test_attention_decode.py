import math

import pytest
import torch
from hypothesis import given, strategies as st

import kernels
from kernels.attention_decode import decode_attention_reference, decode_config
from tests.kernels.kernel_testing import (
    ATTENTION_TOL, DEVICE, DTYPES, RANDOM_SHAPES, assert_close, randn, triton_path,
)
from tests.kernels.launches import MODELS, jit_cache_key, model_launches


def check_decode(B, Hq, Hkv, D, S, kv_start, kv_end, dtype, seed=0):
    """The kernel gets caches that are NaN outside each row's [kv_start, kv_end); the reference gets
    zeros there instead (SDPA turns a masked NaN into NaN)."""
    g = torch.Generator().manual_seed(seed)
    q = randn(B, Hq, D, dtype=dtype, gen=g)
    k_cache = randn(B, Hkv, S, D, dtype=dtype, gen=g)
    v_cache = randn(B, Hkv, S, D, dtype=dtype, gen=g)
    for b in range(B):
        for c in (k_cache, v_cache):
            c[b, :, :kv_start[b]] = float("nan")
            c[b, :, kv_end[b]:] = float("nan")
    kvs = torch.tensor(kv_start, dtype=torch.int64, device=DEVICE)
    kve = torch.tensor(kv_end, dtype=torch.int32, device=DEVICE)  # the engine passes int32
    scale = 1 / math.sqrt(D)
    ref = decode_attention_reference(q, k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0), kvs, kve, scale)
    with triton_path():
        out = kernels.decode_attention(q, k_cache, v_cache, kvs, kve, scale)
    assert_close(out, ref, ATTENTION_TOL[dtype])


# (B, Hq, Hkv, D, S, kv_start per row, kv_end per row)
CASES = [
    (1, 4, 4, 8, 8, [0], [1]),                    # first token, head dim 8
    (2, 8, 4, 8, 40, [0, 5], [33, 33]),           # stories260K-like, left padding
    (2, 9, 3, 64, 70, [3, 0], [70, 41]),          # SmolLM2-like GQA 3, a row ending at S
    (1, 8, 2, 128, 100, [0], [97]),               # GQA 4, head dim 128
    (2, 8, 1, 16, 300, [0, 250], [257, 299]),     # GQA 8, several slices, padding spans slices
    (1, 2, 2, 24, 65, [64], [65]),                # head dim 24; the only key is the cache's last
    (1, 128, 128, 8, 200, [1], [190]),            # many KV heads: 2 slices of several blocks each
    (1, 2, 1, 16, 2600, [40], [2590]),            # one KV head: 41-82 slices, merged 16 at a time
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,D,S,kv_start,kv_end", CASES)
def test_decode_attention_matches_reference(B, Hq, Hkv, D, S, kv_start, kv_end, dtype):
    check_decode(B, Hq, Hkv, D, S, kv_start, kv_end, dtype, seed=S + D)


@RANDOM_SHAPES
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 3, 4, 8]),
       D=st.sampled_from([8, 16, 24, 64, 128]), S=st.integers(1, 260), dtype=st.sampled_from(DTYPES),
       data=st.data())
def test_decode_attention_random_shapes(B, Hkv, group, D, S, dtype, data):
    kv_end = data.draw(st.lists(st.integers(1, S), min_size=B, max_size=B))
    kv_start = [data.draw(st.integers(0, e - 1)) for e in kv_end]
    check_decode(B, Hkv * group, Hkv, D, S, kv_start, kv_end, dtype, seed=S + D)


def test_decode_config_splits_static_cache():
    # Llama-3-8B, batch 1, 4096 positions: 32 slices of 128 keys (2 blocks each) per KV head.
    cfg = decode_config(1, 8, 4, 4096, 128, torch.bfloat16)
    assert (cfg["num_splits"], cfg["split_len"], cfg["BLOCK_G"], cfg["BLOCK_D"]) == (32, 128, 16, 128)
    for B, Hkv, S in [(1, 1, 1), (3, 3, 77), (64, 32, 4096), (1, 8, 100000)]:
        cfg = decode_config(B, Hkv, 1, S, 64, torch.float16)
        assert cfg["split_len"] % cfg["BLOCK_N"] == 0
        assert (cfg["num_splits"] - 1) * cfg["split_len"] < S <= cfg["num_splits"] * cfg["split_len"]


@pytest.mark.parametrize("model", ["smollm2-135m", "llama3-8b", "stories260k"])
def test_one_compilation_serves_every_cache_length(model):
    """Every kernel of a decode step, over cache lengths 1..4096: the keys Triton's JIT caches compiled
    kernels under. One per kernel; two where head_dim < 16 (a cache stride S * head_dim is then a
    multiple of 16 only for some S, and Triton specialises pointer strides on that)."""
    keys = {}
    for S in range(1, 4097, 13):
        for launch in model_launches(model, torch.float16, cache_len=S, phases=("decode",)):
            keys.setdefault(launch.what, set()).add(jit_cache_key(launch))
    allowed = 2 if MODELS[model]["head_dim"] < 16 else 1
    assert len(keys) == 7 and all(len(k) <= allowed for k in keys.values()), {w: len(k) for w, k in keys.items()}


def test_kv_end_past_the_cache_reads_nothing_outside_it():
    """kv_end comes from device memory (no host check in a CUDA graph): keys past the cache are never
    read. The cache is a view into a NaN buffer; the result equals attention over the whole cache."""
    B, Hq, Hkv, D, S = 1, 4, 2, 16, 70
    g = torch.Generator().manual_seed(2)
    q = randn(B, Hq, D, dtype=torch.float32, gen=g)
    buffers = [torch.full((B, Hkv, S + 64, D), float("nan"), device=DEVICE) for _ in range(2)]
    for b in buffers:
        b[:, :, :S] = randn(B, Hkv, S, D, dtype=torch.float32, gen=g)
    kc, vc = (b[:, :, :S] for b in buffers)
    kvs = torch.zeros(B, dtype=torch.int64, device=DEVICE)
    ref = decode_attention_reference(q, kc, vc, kvs, torch.full((B,), S, device=DEVICE), 0.25)
    with triton_path():
        out = kernels.decode_attention(q, kc, vc, kvs, torch.full((B,), S + 40, dtype=torch.int32, device=DEVICE),
                                       0.25)
    assert_close(out, ref, ATTENTION_TOL[torch.float32])
