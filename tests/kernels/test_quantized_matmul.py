"""kernels.quant_matmul against its torch reference (dequantize, then multiply in float32): int8 per
channel and in groups of 32 (GGUF Q8_0), int4 in groups of 32/64/128 with offsets, on odd shapes, at
decode (1..8 rows, split-K included) and prefill row counts. Under the Triton interpreter on CPU
(float32 and float16: the interpreter's bfloat16 dot is wrong), natively on a GPU (bfloat16 too)."""


import pytest
import torch

import kernels
from kernels.quantized_matmul import quant_matmul_config, quant_matmul_reference
from model.quant import QuantWeight, pack_int4, quantize
from tests.kernels.kernel_testing import DEVICE, DTYPES, ELEMENTWISE_TOL, assert_close, randn, rel_err, triton_path

import kernels.quantized_matmul as qm
SCHEMES = {"int8": ("int8", None), "q8_0": ("int8", 32), "int4-g32": ("int4", 32), "int4-g64": ("int4", 64),
           "int4-g128": ("int4", 128)}


def quant_weight(N: int, K: int, scheme: str, seed: int = 0) -> QuantWeight:
    kind, group = SCHEMES[scheme]
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    q = quantize(w, kind, group)
    return QuantWeight(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in q))


def check(x: torch.Tensor, w: QuantWeight):
    ref = quant_matmul_reference(x, w)
    x_before = x.clone()
    with triton_path():  # NaN-filled outputs: an element the kernel does not write fails
        out = kernels.quant_matmul(x, w)
    assert_close(out, ref, ELEMENTWISE_TOL[x.dtype], f"x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.kind} "
                                                     f"group {w.group_size}")
    assert torch.equal(x, x_before)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("M", [1, 3, 8])
def test_decode_rows_match_reference(M, scheme, dtype):
    """N = 70 (not a multiple of the 64-row block), K = 384 (3 groups of 128, 12 of 32)."""
    g = torch.Generator().manual_seed(M)
    check(randn(M, 384, dtype=dtype, gen=g), quant_weight(70, 384, scheme, seed=M))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", ["int8", "int4-g32"])
def test_prefill_rows_match_reference(scheme, dtype):
    """40 rows (the 64-row prefill tile, masked) in a [2, 20, K] batch."""
    g = torch.Generator().manual_seed(5)
    out = check(randn(2, 20, 256, dtype=dtype, gen=g), quant_weight(33, 256, scheme, seed=5))
    assert out.shape == (2, 20, 33)


@pytest.mark.parametrize("scheme", ["int8", "q8_0", "int4-g64"])
def test_split_k_matches_reference(scheme):
    """Few row blocks, long rows: K is split (and the float32 partial sums added by the second kernel)."""
    kind, group = SCHEMES[scheme]
    N, K = 70, 2048 + 64 * (group is None)  # per channel: the last chunk half full
    assert quant_matmul_config(2, N, K, kind, group or K, torch.float16)["SPLIT_K"] > 1
    g = torch.Generator().manual_seed(7)
    check(randn(2, K, dtype=torch.float16, gen=g), quant_weight(N, K, scheme, seed=7))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gguf_q4_0_blocks_match_reference(dtype):
    """GGUF Q4_0 as model.quant keeps it: groups of 32, offset -8 d (symmetric), any nibbles."""
    g = torch.Generator().manual_seed(8)
    N, K = 50, 320
    nibbles = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    d = (torch.rand(N, K // 32, generator=g) * 0.01).half()
    w = QuantWeight(pack_int4(nibbles).to(DEVICE), d.to(DEVICE), (-8 * d).to(DEVICE), 32)
    check(randn(3, K, dtype=dtype, gen=g), w)


def test_per_channel_int8_with_k_not_a_multiple_of_16():
    g = torch.Generator().manual_seed(3)
    check(randn(3, 200, dtype=torch.float32, gen=g), quant_weight(19, 200, "int8", seed=3))


def test_strided_rows():
    g = torch.Generator().manual_seed(4)
    buf = randn(3, 400, dtype=torch.float16, gen=g)
    check(buf[:, 8:264], quant_weight(40, 256, "int4-g64", seed=4))


def test_nibble_order_matters():
    """The check can fail: the same bytes read with the nibbles of each block swapped (input j in the
    high nibble) are far from the reference."""
    w = quant_weight(64, 256, "int4-g32", seed=6)
    swapped = QuantWeight((w.data << 4) | (w.data >> 4), w.scale, w.offset, w.group_size)
    x = randn(1, 256, dtype=torch.float32, gen=torch.Generator().manual_seed(6))
    with triton_path():
        out = kernels.quant_matmul(x, swapped)
    assert rel_err(out, quant_matmul_reference(x, w)) > 0.1


def test_empty_batch():
    w = quant_weight(16, 64, "int8")
    with triton_path():
        assert kernels.quant_matmul(torch.zeros(0, 64, device=DEVICE), w).shape == (0, 16)


def test_config_is_pure_and_covers_k():
    for M in (1, 8, 17, 512):
        for N, K in ((960, 576), (576, 1536), (4096, 11008), (12288, 4096), (70, 2048)):
            for scheme, (kind, group) in SCHEMES.items():
                if K % (group or K):
                    continue
                cfg = quant_matmul_config(M, N, K, kind, group or K, torch.bfloat16)
                assert cfg == quant_matmul_config(M, N, K, kind, group or K, torch.bfloat16)
                chunks = -(-K // cfg["BLOCK_K"])
                assert (cfg["SPLIT_K"] - 1) * cfg["ITERS"] < chunks <= cfg["SPLIT_K"] * cfg["ITERS"], (M, N, K, cfg)
                assert cfg["BLOCK_K"] % cfg["PART_K"] == 0 and (group is None or group % cfg["PART_K"] == 0)
                assert cfg["SPLIT_K"] == 1 or M <= 16
    # Llama-2-7B at batch 1: o and down have 64 row blocks and are split 4 ways; gate/up fills the GPU
    assert quant_matmul_config(1, 4096, 4096, "int4", 64, torch.bfloat16)["SPLIT_K"] == 4
    assert quant_matmul_config(1, 4096, 11008, "int8", 11008, torch.bfloat16)["SPLIT_K"] == 4
    assert quant_matmul_config(1, 22016, 4096, "int4", 64, torch.bfloat16)["SPLIT_K"] == 1


def test_group_without_a_16_input_factor_is_refused():
    with pytest.raises(ValueError, match="group size 8"):
        quant_matmul_config(1, 64, 64, "int8", 8, torch.float16)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_cuda_tensors_run_triton_cpu_tensors_the_reference(monkeypatch, device):
    monkeypatch.delenv("SUBLAYER_TRITON", raising=False)
    called = []
    monkeypatch.setattr(qm, "quant_matmul_triton", lambda *a: called.append("triton"))
    monkeypatch.setattr(qm, "quant_matmul_reference", lambda *a: called.append("reference"))
    w = QuantWeight(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in quantize(torch.randn(8, 32), "int8")))
    kernels.quant_matmul(torch.randn(1, 32, device=device), w)
    assert called == (["triton"] if device == "cuda" else ["reference"])


def test_one_compilation_per_scheme_for_every_decode_batch():
    """Decode at 1..8 rows compiles what 1 row compiles: the row count is a run-time argument, so a
    server's changing batch never compiles again."""
    from tests.kernels.launches import jit_cache_key
    from tests.kernels.test_ptxas import quant_launches

    for scheme in ("int8", "int4-g64"):
        one = {jit_cache_key(la) for la in quant_launches("llama2-7b", torch.bfloat16, scheme, rows=(1,))}
        every = {jit_cache_key(la) for la in quant_launches("llama2-7b", torch.bfloat16, scheme, rows=range(1, 9))}
        assert one == every, (len(one), len(every))
