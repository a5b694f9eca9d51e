"""bench.latency --quants: our rows once per quantization, labelled, with the quantized bytes; bad entries exit 2."""

import json

from bench.hf_reference import STORIES
from tests.bench.test_latency import run


def test_quant_rows_are_labelled_with_their_bytes(tmp_path):
    r = run("--quick", "--model", str(STORIES), "--impls", "ours-eager,hf-eager", "--plans", "full",
            "--quants", "none,int8-g4", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "latency.json").read_text())["rows"]
    assert sorted((x["impl"], x["quant"]) for x in rows) == [("hf-eager", "none"), ("ours-eager", "int8-g4"),
                                                              ("ours-eager", "none")]
    by = {(x["impl"], x["quant"]): x for x in rows}
    assert "error" not in by[("ours-eager", "int8-g4")]
    assert by[("ours-eager", "int8-g4")]["weights_MiB"] < 0.5 * by[("ours-eager", "none")]["weights_MiB"]
    assert "| int8-g4 |" in (tmp_path / "latency.md").read_text()


def test_bad_quants_are_clear_errors(tmp_path):
    for quants, message in (("int3", "--quants: expected entries"), ("int4-g48", "--group-size: int4 groups"),
                            ("int8-gx", "--quants")):
        r = run("--quick", "--model", str(STORIES), "--quants", quants, "--out", str(tmp_path))
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_quant_quality_rows(tmp_path):
    import subprocess
    import sys

    from tests.bench.test_latency import ROOT

    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, "-m", "bench.quant_quality", "--model", str(STORIES), "--schemes",
                        "int8,int8-g4,int4-g32", "--tokens", "32", "--speed", "8", "--dtypes", "float32",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    int8, g4, int4 = res["errors"]
    assert 0 < g4["rel_err"] < int8["rel_err"] < 0.05 and int8["top1_agree"] > 0.9
    assert int8["weight_MiB"] < 0.5 * int8["float_weight_MiB"]
    assert "does not divide the input dimension 172" in int4["refused"]
    assert {(x["scheme"], x["context"]) for x in res["speed"]} == {("int8", 8), ("int8-g4", 8)}
    assert all(x["decode_ms"] > 0 for x in res["speed"])
