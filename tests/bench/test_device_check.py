"""bench/device_check.sh on a machine without CUDA: its CPU part runs (parity with Hugging Face and
generation on the torch references), its CUDA stages skip with a message, and it exits 0."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from bench.device_check import STAGES, bf16_verdict, main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script is the 8-minute GPU check itself")
def test_script_runs_its_cpu_part_and_skips_cuda_stages(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)  # the script runs as users run it
    proc = subprocess.run(["bash", str(ROOT / "bench/device_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for stage in ("dispatch", "graph_replay", "tiles", "quant_matmul", "offsets64", "bf16_graph_vs_plain",
                  "graph_captures"):
        assert f"{stage}: SKIP (needs CUDA)" in summary, summary
    for stage in ("env", "fp32_parity", "bf16_vs_fp32", "generate_vs_hf"):
        assert f"{stage}: PASS" in summary, summary
    for step in ("pytest", "kernels_bench", "latency"):
        assert f"{step}: skipped (no CUDA)" in summary
    assert "gqa4: vs HF prefill" in (tmp_path / "fp32_parity.txt").read_text()
    assert set(STAGES) <= {p.stem for p in tmp_path.glob("*.txt")}


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit) as e:
        main(["no_such_stage"])
    assert e.value.code == 2


def test_bf16_verdict_is_relative_to_hugging_face():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(64, 50, generator=g)
    noise = torch.randn(64, 50, generator=g)
    hf = truth + 0.01 * noise
    assert bf16_verdict(hf.clone(), hf, truth)["ok"]  # as wrong as HF's own bf16: fine
    assert bf16_verdict(truth + 0.015 * noise.flip(0), hf, truth)["ok"]
    assert not bf16_verdict(truth + 0.05 * noise, hf, truth)["ok"]  # 5x HF's error
    shuffled = truth[:, torch.randperm(50, generator=g)]
    assert not bf16_verdict(shuffled, hf, truth)["ok"]


def test_quant_matmul_stage_runs_on_small_shapes(monkeypatch):
    """The quant_matmul stage's code on CPU: the Triton kernel under the interpreter on small shapes,
    a wall-clock timer instead of CUDA-graph replays."""
    import time

    from bench import device_check
    from kernels import dispatch

    if not dispatch.INTERPRETED:
        pytest.skip("Triton on CPU tensors needs the interpreter")
    monkeypatch.setattr(device_check, "need_cuda", lambda dev: None)
    monkeypatch.setattr("bench.latency.copy_bandwidth", lambda dev: 1e10)
    monkeypatch.setattr(device_check, "QUANT_SHAPES", {"tiny": {"down": (24, 1024)}})  # K split 2 ways
    monkeypatch.setattr(device_check, "QUANT_DTYPES", (torch.float16,))  # the interpreter's bf16 dot is wrong
    monkeypatch.setattr(device_check, "QUANT_PREFILL", ("tiny", 20))

    def wall_time(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    monkeypatch.setattr(device_check, "graph_time", wall_time)
    lines = list(device_check.stage_quant_matmul(torch.device("cpu"), quick=False))
    text = "\n".join(lines)
    for scheme in device_check.QUANT_SCHEMES:
        assert f"parity tiny float16 {scheme}: worst relative error" in text, text
        assert f"tiny down [24x1024] {scheme:9s} default     split 2" in text, text
    assert "tiny down [24x1024] bf16 F.linear" in text and "BLOCK_N 128" in text and "unsplit" in text, text
    assert "tiny down [24x1024] prefill 20 rows: bf16 F.linear" in text and "int4-g64 quant_matmul" in text, text
