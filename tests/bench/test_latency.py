"""The latency benchmark runs end to end on a tiny model (a smoke test: it checks output, not speed)."""

import csv
import subprocess
import sys

from tests.models import STORIES


def test_latency_script_runs_and_agrees_with_hf(tmp_path):
    layer0 = tmp_path / "layer0.json"  # HF must be given positions explicitly when layer 0 has no cache
    layer0.write_text('{"version": 1, "name": "layer0", "drop": {"attention": [0, 2]}}')
    r = subprocess.run([sys.executable, "bench/latency.py", "--model", str(STORIES), "--plans",
                        f"full,attn66,plans/block90.json,{layer0}", "--context", "16", "--steps", "3", "--warmup", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "latency_float32_ctx16.csv")))
    assert [row["plan"] for row in rows] == ["full", "attn66", "block90", "layer0"]
    for row in rows:
        assert float(row["ours_ms"]) > 0 and float(row["hf_ms"]) > 0
        # the HF row with dropped modules not run computes the same model as ours
        assert float(row["hf_rel_err"]) < 1e-4
    assert float(rows[1]["ideal_speedup"]) > 1.0
    assert (tmp_path / "latency_float32_ctx16.png").exists()
