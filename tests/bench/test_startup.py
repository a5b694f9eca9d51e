"""bench.startup: the results it writes (table, JSON, plot; no machine paths), its bounded burner, and
its flags. The measurements themselves take minutes and are not run here."""

import json
import subprocess
import sys
import time

from bench import startup


def fake_results():
    walls = [{"impl": impl, "dtype": "bfloat16", "tokens": 16, "cold": "cold" in impl, "walls": [w, w + 1, w + 2],
              "load": [0.5, 0.7, 0.6], "median_s": w + 1,
              "compile_lines": ["compile: 0.05 s (the first decode step; it loaded ...)"] if "sublayer" in impl else []}
             for impl, w in (("sublayer CLI, warm cache", 4.0), ("sublayer CLI, cold cache", 6.0),
                             ("transformers script (HF eager, sdpa)", 9.0))]
    steps = [{"burner": b, "threads": t, "policy": p, "load": 1.0, "steps": 256, "median_ms": 12.0 + t,
              "p99_ms": 20.0 * (1 + b), "max_ms": 30.0} for b in (False, True) for t in (1, 2) for p in ("spin", "passive")]
    meta = {"date": "2026-01-01 00:00 UTC", "torch": "2.13.0", "cores": 2, "steps": 256, "step_dtype": "bfloat16"}
    return walls, steps, meta


def test_results_are_a_table_json_and_plot_without_machine_paths(tmp_path):
    walls, steps, meta = fake_results()
    startup.write_results(tmp_path, walls, steps, meta)
    md = (tmp_path / "startup.md").read_text()
    assert "| sublayer CLI, warm cache | bfloat16 | 16 | 5.00 | 4.00-6.00 | 3 | 0.5-0.7 | compile: 0.05 s |" in md
    assert "| one busy loop | 2 | passive | 256 | 14.0 | 40.0 | 30.0 | 1.0 |" in md
    data = json.loads((tmp_path / "startup.json").read_text())
    assert len(data["wall"]) == 3 and len(data["steps"]) == 8
    assert (tmp_path / "startup.png").stat().st_size > 10_000
    for f in ("startup.md", "startup.json"):
        text = (tmp_path / f).read_text()
        assert "/root" not in text and "/home" not in text and "/work" not in text and "/tmp" not in text


def test_the_burner_stops_by_itself():
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", startup.BURNER.format(seconds=0.5)], check=True, timeout=30)
    assert 0.4 < time.perf_counter() - t0 < 20


def test_bad_flags_exit_2(capsys):
    assert startup.main(["--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
