"""attend_key_range, the online softmax both attention kernels share, on its own: a block of queries over
a key range with per-row visibility, against a masked softmax in torch."""

import math

import pytest
import torch
import triton
import triton.language as tl

from kernels.online_softmax import attend_key_range
from tests.kernels.kernel_testing import DEVICE, assert_close, randn


@triton.jit
def _attend_kernel(Q, K, V, FIRST, LAST, OUT, lo, hi, D, qk_scale,
                   M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :], mask=d_mask[None, :], other=0.0)
    acc, m_i, l_i = attend_key_range(
        tl.zeros([M, BLOCK_D], dtype=tl.float32), tl.full([M], float("-inf"), dtype=tl.float32),
        tl.zeros([M], dtype=tl.float32), q, K, V, D, D, lo, hi, tl.load(FIRST + offs_m), tl.load(LAST + offs_m),
        qk_scale, offs_d, d_mask, BLOCK_N)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(OUT + offs_m[:, None] * D + offs_d[None, :], out, mask=d_mask[None, :])


def reference(q, k, v, lo, hi, first, last, scale):
    """Row i: softmax over keys max(lo, first[i]) .. min(hi - 1, last[i]); no key seen -> zeros."""
    keys = torch.arange(k.shape[0], device=q.device)[None]
    seen = (keys >= lo) & (keys < hi) & (keys >= first[:, None]) & (keys <= last[:, None])
    scores = (q @ k.nan_to_num(0.0).T * scale).masked_fill(~seen, float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)  # a row that sees nothing: all -inf -> NaN -> 0
    return p @ v.nan_to_num(0.0)


@pytest.mark.parametrize("D,lo,hi,BLOCK_N", [(16, 0, 40, 16), (24, 5, 70, 16), (64, 33, 34, 32), (16, 20, 20, 16)])
def test_attend_key_range_matches_masked_softmax(D, lo, hi, BLOCK_N):
    """Unaligned ranges, a single key, an empty range, head dim 24 padded to 32; keys outside [lo, hi)
    are NaN, so reading one shows."""
    M, S = 16, 80
    g = torch.Generator().manual_seed(D + lo)
    q, k, v = randn(M, D, dtype=torch.float32, gen=g), randn(S, D, dtype=torch.float32, gen=g), \
        randn(S, D, dtype=torch.float32, gen=g)
    k[:lo], k[hi:], v[:lo], v[hi:] = (float("nan"),) * 4
    first = torch.randint(0, S, (M,), generator=g).to(DEVICE, torch.int32)
    last = (first + torch.randint(-3, 40, (M,), generator=g).to(DEVICE)).to(torch.int32)
    out = torch.empty(M, D, device=DEVICE)
    scale = 1 / math.sqrt(D)
    _attend_kernel[(1,)](q, k, v, first, last, out, lo, hi, D, scale * 1.4426950408889634,
                         M=M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(D)))
    assert_close(out, reference(q, k, v, lo, hi, first, last, scale), 1e-5)
