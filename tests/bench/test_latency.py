"""The latency benchmark runs end to end on a tiny model (a smoke test: it checks output, not speed)."""

import json
import subprocess
import sys
from pathlib import Path

from bench.hf_reference import STORIES


ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return subprocess.run([sys.executable, "-m", "bench.latency", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)


def test_quick_run_writes_every_output_and_agrees_with_hf(tmp_path):
    layer0 = tmp_path / "layer0.json"  # HF must be given positions explicitly when layer 0 has no cache
    layer0.write_text('{"version": 1, "name": "layer0", "drop": {"attention": [0, 2]}}')
    r = run("--quick", "--model", str(STORIES), "--plans", f"full,{layer0}", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "out" / "latency.json").read_text())
    rows = out["rows"]
    assert [(x["plan"], x["impl"]) for x in rows] == [(p, i) for p in ("full", "layer0")
                                                      for i in ("ours", "ours-eager", "hf-eager")]
    assert out["meta"]["copy_GBps"] > 0
    for x in rows:
        assert "error" not in x, x
        assert 0 < x["decode_p10_ms"] <= x["decode_ms"] <= x["decode_p90_ms"]
        assert x["prefill_ms"] > 0 and x["tok_s"] > 0 and x["peak_MiB"] > 0 and x["GBps"] > 0
        if x["impl"] != "ours":  # eager reference and HF (dropped modules not run) compute our model
            assert x["rel_err_vs_ours"] < 1e-4
    layer0_row = rows[3]
    assert layer0_row["attn_dropped"] == 2 and layer0_row["ideal_speedup"] > 1
    assert layer0_row["weights_MiB"] < rows[0]["weights_MiB"] and layer0_row["kv_MiB"] < rows[0]["kv_MiB"]
    for name in ("latency.csv", "latency.md", "latency_vs_context.png", "speedup_vs_ideal.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "Checks (batch 1)" in (tmp_path / "out" / "latency.md").read_text()


def test_paired_mode_alternates_plans_in_one_process(tmp_path):
    r = run("--quick", "--model", str(STORIES), "--paired", "--impls", "ours,ours-eager", "--repeats", "2",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "latency.json").read_text())["rows"]
    assert sorted((x["plan"], x["impl"]) for x in rows) == sorted(
        (p, i) for p in ("full", "attn66") for i in ("ours", "ours-eager"))
    for x in rows:
        assert x["paired"] and len(x["decode_ms_runs"]) == 2 and "peak_MiB" not in x
        if x["impl"] == "ours-eager":
            assert x["rel_err_vs_ours"] < 1e-4
    assert "Paired" in (tmp_path / "latency.md").read_text()


def test_bad_values_are_clear_errors(tmp_path):
    for args, field in [(["--impls", "ours,vllm"], "--impls"), (["--contexts", "0"], "--contexts"),
                        (["--shape", "llama9"], "--shape"), (["--dtypes", "fp8"], "--dtypes"),
                        (["--plans", "nonsense"], "nonsense")]:
        r = run("--model", str(STORIES), "--plans", "full", *args, "--out", str(tmp_path))
        assert r.returncode == 2 and field in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not list(tmp_path.iterdir())  # nothing written


def test_shape_mode_uses_random_weights_of_the_named_shape():
    """The named shapes are the published configs, and their random weights are never zero."""
    import torch

    from model.shapes import RandomWeights, shape_config

    c = shape_config("llama3-8b")
    assert (c.hidden_size, c.num_layers, c.num_kv_heads, c.intermediate_size) == (4096, 32, 8, 14336)
    assert shape_config("llama2-13b").num_layers == 40
    w = RandomWeights().read_cat([("a.weight", (64, 32)), ("b.weight", (16, 32))], torch.float32, "cpu")
    n = RandomWeights().read("model.norm.weight", (32,), torch.float32, "cpu")
    assert w.shape == (80, 32) and bool((w != 0).all()) and 0.01 < float(w.std()) < 0.03
    assert bool((n > 0.5).all())


def test_shape_mode_rows_for_ours_and_hf(monkeypatch):
    """``--shape``: one row each for ours and HF eager on a (tiny, patched-in) named shape, in process."""
    from bench import latency
    from model import shapes

    tiny = {**shapes.SHAPES["llama2-7b"], "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 4, "intermediate_size": 96, "vocab_size": 300}
    monkeypatch.setitem(shapes.SHAPES, "tiny", tiny)
    base = {"plan": "attn66", "dtype": "float32", "batch": 2, "context": 8, "model": None, "shape": "tiny",
            "device": "cpu", "steps": 3, "warmup": 1, "threads": None}
    for impl in ("ours", "hf-eager"):
        row = latency.measure({**base, "impl": impl})
        assert row["plan"] == "attn66" and row["attn_dropped"] == 1 and row["decode_ms"] > 0, row
        assert row["kv_MiB"] == 2 * 2 * 2 * 8 * 64 * 4 / 2**20  # 2 kept attention layers, batch 2, 8 positions


def test_warm_up_prefill_has_the_real_length(monkeypatch, tmp_path):
    """The warm-up prefill runs the prompt's own length (so Triton compiling that length stays out of
    the timed prefill), for a single row and for every plan of a paired run."""
    from bench import latency
    from model import shapes

    tiny = {**shapes.SHAPES["llama2-7b"], "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 4, "intermediate_size": 96, "vocab_size": 300}
    monkeypatch.setitem(shapes.SHAPES, "tiny", tiny)
    lengths = []
    runner = latency.ours_runner

    def recording_runner(engine, batch):
        prefill, step = runner(engine, batch)
        return (lambda ids: lengths.append(ids.shape[1]) or prefill(ids)), step

    monkeypatch.setattr(latency, "ours_runner", recording_runner)
    spec = {"impl": "ours", "plan": "full", "dtype": "float32", "batch": 1, "context": 12, "model": None,
            "shape": "tiny", "device": "cpu", "steps": 2, "warmup": 0, "threads": None}
    latency.measure(spec)
    assert lengths == [12, 12]
    lengths.clear()
    latency.measure_paired({**spec, "plans": ["full", "attn66"], "logits_out": [str(tmp_path / "a"), str(tmp_path / "b")]})
    assert lengths == [12, 12, 12, 12]


# ---- the llama.cpp peer rows -------------------------------------------------------------------------

def _llama_args(*extra):
    from bench import latency

    return latency.parse_args(["--model", str(STORIES), "--impls", "ours,llama.cpp", "--plans", "full", "--contexts",
                               "8", "--batches", "1", "--dtypes", "float32", *extra])


def test_llama_cpp_rows_skipped_with_a_message_when_absent(monkeypatch, capsys):
    from bench import latency, llama_cpp_peer

    monkeypatch.setattr(llama_cpp_peer, "available", lambda: False)
    specs = latency.specs_of(_llama_args("--gguf", "whatever.gguf"))
    assert [s["impl"] for s in specs] == ["ours"]
    assert "llama.cpp rows skipped: llama-cpp-python is not installed" in capsys.readouterr().err


def test_llama_cpp_bad_gguf_fails_before_measuring(monkeypatch, tmp_path):
    import pytest

    from bench import latency, llama_cpp_peer
    from model.errors import UserError

    monkeypatch.setattr(llama_cpp_peer, "available", lambda: True)
    with pytest.raises(UserError, match=r"missing\.gguf: no such file"):
        latency.specs_of(_llama_args("--gguf", str(tmp_path / "missing.gguf")))
    with pytest.raises(UserError, match=r"--impls llama.cpp with --model: name the model's GGUF file\(s\) with --gguf"):
        latency.specs_of(_llama_args())


def test_llama_cpp_row_runs_the_same_model(tmp_path):
    """A float32 GGUF of a tiny random Llama: the llama.cpp row (its own subprocess) has every timing
    field, and its first decode step's logits are ours within its float16 KV cache's rounding."""
    import pytest

    from bench import latency, llama_cpp_peer

    if not llama_cpp_peer.available():
        pytest.skip("llama-cpp-python not installed (built outside CI)")
    import torch
    from safetensors.torch import load_file

    from model.gguf import import_gguf
    from tests.model.test_gguf import write_tiny_gguf

    path, _ = write_tiny_gguf(tmp_path / "tiny.gguf")
    spec = {"impl": "llama.cpp", "plan": "full", "dtype": "float32", "batch": 1, "context": 8, "gguf": str(path),
            "model": None, "shape": None, "device": "cpu", "steps": 3, "warmup": 1, "threads": 1,
            "logits_out": str(tmp_path / "peer.safetensors")}
    row = latency.run_worker(spec)
    assert "error" not in row, row
    assert (row["gguf"], row["weights"], row["context"]) == ("tiny.gguf", "F32", 8)
    assert 0 < row["decode_p10_ms"] <= row["decode_ms"] <= row["decode_p90_ms"] and row["prefill_ms"] > 0
    assert row["kv_MiB"] == 2 * 2 * 2 * 16 * 8 * 2 / 2**20  # 2 layers, 2 KV heads of 16, 8 positions, float16
    ours = latency.measure({**spec, "impl": "ours-eager", "model": str(import_gguf(path, tmp_path / "ckpt", show_progress=False)),
                            "logits_out": str(tmp_path / "ours.safetensors")})
    a, b = (load_file(tmp_path / f"{n}.safetensors")["logits"].double() for n in ("ours", "peer"))
    assert float((a - b).norm() / a.norm()) < 2e-3 and torch.equal(a.argmax(-1), b.argmax(-1))
    assert ours["context"] == 8
