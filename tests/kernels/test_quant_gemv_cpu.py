"""The C++ one-row quantized projection (``kernels.quant_gemv_cpu``) against its reference (dequantize,
then multiply in float32) on odd shapes and every layout the runtime stores; the compiled step calls
it; bad arguments are refused by the op."""

import re
from pathlib import Path

import pytest
import torch

from kernels import quant_gemv_cpu
from kernels.quantized_matmul import quant_matmul_reference
from model.quant import quantize

AVX512 = re.search(r"\bavx512f\b", Path("/proc/cpuinfo").read_text()) is not None
pytestmark = pytest.mark.skipif(not AVX512, reason="the kernel is built for AVX-512 CPUs only")


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_builds_and_loads_on_this_cpu():
    assert quant_gemv_cpu.available()
    assert quant_gemv_cpu.library_path().is_file()


def test_a_failed_build_falls_back_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SUBLAYER_CACHE", str(tmp_path))
    monkeypatch.setattr(quant_gemv_cpu, "_available", None)
    monkeypatch.setattr(quant_gemv_cpu, "_build_command", lambda out: ["sh", "-c", "echo 'no compiler here' >&2; exit 1"])
    assert quant_gemv_cpu.available() is False and quant_gemv_cpu.available() is False  # asked once
    err = capsys.readouterr().err
    assert err.count("cannot build the CPU quantized kernel (no compiler here)") == 1
    assert not any(tmp_path.rglob("*.so"))  # nothing half-installed


# (kind, group, N, K, offset): per channel (group None) with K not a multiple of 16 (the scalar tail) or
# of 64; GGUF's blocks of 32 (the unrolled path); groups of 4 (int8: no vector loop at all); 4-bit with
# and without offsets; a single row.
CASES = [("int8", None, 7, 172, False), ("int8", None, 33, 576, False), ("int8", 32, 19, 96, False),
         ("int8", 4, 5, 44, False), ("int8", 64, 1, 128, False), ("int4", 32, 9, 96, True),
         ("int4", 64, 17, 192, True), ("int4", 128, 3, 384, True), ("int4", 32, 5, 64, False)]


@pytest.mark.parametrize("kind,group,N,K,offset", CASES)
def test_equals_dequantize_then_matmul(kind, group, N, K, offset):
    g = torch.Generator().manual_seed(N * K)
    w = quantize(torch.randn(N, K, generator=g) * 0.05, kind, group)
    if not offset:
        w = w._replace(offset=None)
    x = torch.randn(K, generator=g)
    out = quant_gemv_cpu.quant_gemv(x, w)
    assert out.shape == (N,) and out.dtype == torch.float32
    assert rel(out, quant_matmul_reference(x, w)) < 1e-6  # float32 sums in another order


def test_the_compiled_step_calls_the_kernel():
    from runtime import step

    w = quantize(torch.randn(48, 64) * 0.05, "int8")
    x = torch.randn(1, 1, 64)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(step.multiply_reduce, backend=record, fullgraph=True, dynamic=False)(x, w)
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert {torch.ops.sublayer.quant_gemv, torch.ops.sublayer.quant_gemv.default} & set(targets)
    assert rel(out.reshape(-1), quant_matmul_reference(x.reshape(-1), w)) < 1e-6


@pytest.mark.parametrize("bad,message", [
    (lambda x, w: (x.double(), w.data, w.scale, None, 32), "x must be float32"),
    (lambda x, w: (x, w.data[:, :32], w.scale, None, 32), "data must be"),
    (lambda x, w: (x, w.data, w.scale, None, 24), "bad group size"),
    (lambda x, w: (x, w.data, w.scale.float(), None, 32), "scale must be float16"),
    (lambda x, w: (x, w.data, w.scale, w.scale, 32), "int8 weights have no offset"),
])
def test_bad_arguments_are_refused(bad, message):
    w = quantize(torch.randn(8, 64), "int8", 32)
    assert quant_gemv_cpu.available()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sublayer.quant_gemv(*bad(torch.randn(64), w))
