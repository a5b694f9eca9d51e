import math

import pytest
import torch
from hypothesis import given, strategies as st

import kernels
from kernels.attention_prefill import prefill_attention_reference, prefill_config, prefill_grid
from tests.kernels.kernel_testing import (
    ATTENTION_TOL, DEVICE, DTYPES, RANDOM_SHAPES, assert_close, randn, triton_path,
)


def check_prefill(B, T, Hq, Hkv, D, q_start, kv_start, dtype, seed=0, strided_q=False):
    """q for cache indices q_start .. q_start+T-1 over a cache that is valid (finite) up to q_start+T
    and NaN after it."""
    g = torch.Generator().manual_seed(seed)
    S = q_start + T + 5
    if strided_q:  # q as a view of a fused projection output (rows of q not contiguous)
        q = randn(B, T, Hq + 2 * Hkv, D, dtype=dtype, gen=g)[:, :, :Hq]
    else:
        q = randn(B, T, Hq, D, dtype=dtype, gen=g)
    k_cache = randn(B, Hkv, S, D, dtype=dtype, gen=g)
    v_cache = randn(B, Hkv, S, D, dtype=dtype, gen=g)
    k_cache[:, :, q_start + T:] = float("nan")
    v_cache[:, :, q_start + T:] = float("nan")
    kv_start = torch.tensor(kv_start, dtype=torch.int64, device=DEVICE)
    scale = 1 / math.sqrt(D)
    ref = prefill_attention_reference(q, k_cache, v_cache, q_start, kv_start, scale)
    with triton_path():
        out = kernels.prefill_attention(q, k_cache, v_cache, q_start, kv_start, scale)
    assert_close(out, ref, ATTENTION_TOL[dtype])


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,Hq,Hkv,D,q_start,kv_start", CASES)
def test_prefill_attention_matches_reference(B, T, Hq, Hkv, D, q_start, kv_start, dtype):
    check_prefill(B, T, Hq, Hkv, D, q_start, kv_start, dtype, seed=T * D + q_start)


def test_prefill_attention_strided_q():
    check_prefill(2, 5, 4, 2, 16, 2, [0, 1], torch.float32, seed=7, strided_q=True)


@RANDOM_SHAPES
@given(B=st.integers(1, 2), T=st.integers(1, 40), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 3, 4, 8]),
       D=st.sampled_from([8, 16, 24, 64, 128]), q_start=st.integers(0, 20), dtype=st.sampled_from(DTYPES),
       data=st.data())
def test_prefill_attention_random_shapes(B, T, Hkv, group, D, q_start, dtype, data):
    kv_start = data.draw(st.lists(st.integers(0, q_start + T), min_size=B, max_size=B))
    check_prefill(B, T, Hkv * group, Hkv, D, q_start, kv_start, dtype, seed=T + D)


def test_prefill_config_pads_head_dim_for_tl_dot():
    assert prefill_config(512, 8, torch.float16)["BLOCK_D"] == 16
    assert prefill_config(512, 128, torch.bfloat16)["BLOCK_M"] == 128
    assert prefill_config(7, 64, torch.float16)["BLOCK_M"] == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D,T", [(64, 130), (128, 300)])
def test_production_tile_matches_reference(D, T, dtype):
    """The tile every prefill of 65+ tokens takes (fp16/bf16: BLOCK_M 128, 8 warps; fp32: BLOCK_M 64),
    at real head dims, with a ragged last tile, GQA 2 and left padding."""
    cfg = prefill_config(T, D, dtype)
    assert (cfg["BLOCK_M"], cfg["num_warps"]) == ((128, 8) if dtype == torch.float16 else (64, 8))
    check_prefill(1, T, 2, 1, D, 0, [3], dtype, seed=D + T)


def test_grid_puts_batch_times_heads_on_the_long_axis():
    """CUDA allows 2^31 - 1 programs on grid axis 0, 65535 on the others."""
    cfg = prefill_config(1024, 64, torch.bfloat16)
    grid = prefill_grid(B=64, T=1024, Hq=2048, cfg=cfg)
    assert grid == (64 * 2048, 8)
    assert grid[0] < 2**31 and all(n <= 65535 for n in grid[1:])
