"""Importance scores equal a Hugging Face forward-hook reference; plans drop exactly the least important."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import runtime
from tools.calib import WIKITEXT2, token_windows
from tools.importance import choose, importance, similarities
from bench.hf_reference import STORIES, hf_model, plan_parity


@torch.inference_mode()
def hf_similarities(path, windows):
    """Reference: forward hooks on the HF decoder layers' modules, per-token cosine averaged over tokens."""
    hf = hf_model(path)
    L = len(hf.model.layers)
    attn, mlp, block = [0.0] * L, [0.0] * L, [0.0] * L
    seen = {}
    hooks = []

    def cos(a, b):
        return F.cosine_similarity(a.float(), b.float(), dim=-1).sum().item()

    for i, layer in enumerate(hf.model.layers):
        def layer_pre(mod, args, kwargs, i=i):
            seen["in"] = kwargs.get("hidden_states", args[0] if args else None)

        def attn_out(mod, args, output, i=i):
            seen["mid"] = seen["in"] + output[0]
            attn[i] += cos(seen["in"], seen["mid"])

        def mlp_out(mod, args, output, i=i):
            out = seen["mid"] + output
            mlp[i] += cos(seen["mid"], out)
            block[i] += cos(seen["in"], out)

        hooks += [layer.register_forward_pre_hook(layer_pre, with_kwargs=True),
                  layer.self_attn.register_forward_hook(attn_out), layer.mlp.register_forward_hook(mlp_out)]
    hf(windows)
    for h in hooks:
        h.remove()
    n = windows.numel()
    return [a / n for a in attn], [m / n for m in mlp], [b / n for b in block]


def check_scores(path, samples, seq_len):
    engine = runtime.load(str(path), dtype="float32", device="cpu")
    windows = token_windows(engine.tokenizer, WIKITEXT2, seq_len, samples)
    ours = similarities(engine, windows, batch_size=2, progress=False)
    ref = hf_similarities(path, windows)
    for kind, r in zip(("attention", "mlp", "block"), ref):
        assert max(abs(a - b) for a, b in zip(ours[kind], r)) < 1e-4, kind
    L = engine.config.num_layers
    for i in range(L):  # a one-block span is the block itself
        assert abs(ours["block_span"][i][i + 1] - ours["block"][i]) < 1e-12
    return ours


def test_stories_scores_match_hf():
    check_scores(STORIES, samples=4, seq_len=64)


def test_smollm2_scores_match_hf(smollm2):
    check_scores(smollm2, samples=2, seq_len=64)


def test_plan_drops_the_n_least_important():
    engine = runtime.load(str(STORIES), dtype="float32", device="cpu")
    scores = similarities(engine, token_windows(engine.tokenizer, WIKITEXT2, 64, 2), progress=False)
    imp = importance(scores)
    for n in (1, 2, 4):
        drop = choose(scores, "attention", n)
        ranked = sorted(range(5), key=lambda i: imp["attention"][i])
        assert drop["attention"] == sorted(ranked[:n]) and not drop["mlp"] and not drop["block"]
    joint = choose(scores, "joint", 3)
    flat = sorted((imp[k][i], k, i) for k in ("attention", "mlp") for i in range(5))[:3]
    picked = {(k, i) for _, k, i in flat}
    got = {("attention", i) for i in joint["attention"]} | {("mlp", i) for i in joint["mlp"]} \
        | {(k, i) for i in joint["block"] for k in ("attention", "mlp")}
    assert got == picked
    span = choose(scores, "span", 2)["block"]
    assert len(span) == 2 and span[1] == span[0] + 1


def test_cli_writes_a_plan_that_loads_and_keeps_parity(tmp_path):
    plan = tmp_path / "imp.json"
    scores = tmp_path / "scores.json"
    r = subprocess.run([sys.executable, "-m", "tools.importance", "--model", str(STORIES), "--calib", str(WIKITEXT2),
                        "--samples", "2", "--seq-len", "64", "--out", str(scores), "--drop", "attention:2",
                        "--plan-out", str(plan)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc, written = json.loads(scores.read_text()), json.loads(plan.read_text())
    imp = doc["importance"]["attention"]
    assert written["drop"]["attention"] == sorted(sorted(range(5), key=lambda i: imp[i])[:2])
    plan_parity(STORIES, hf_model(STORIES), str(plan))


@pytest.mark.parametrize("args, message", [
    (["--calib", "EMPTY"], "empty calibration text"),
    (["--calib", "SHORT", "--seq-len", "64"], "fewer than one window"),
    (["--calib", str(WIKITEXT2), "--drop", "attention:9", "--plan-out", "P"], "between 1 and 5"),
    (["--calib", str(WIKITEXT2), "--drop", "heads:2", "--plan-out", "P"], "unknown kind 'heads'"),
    (["--calib", "MISSING"], "cannot read calibration text"),
])
def test_bad_inputs_are_clear_errors(args, message, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("Once upon a time")
    sub = {"EMPTY": str(tmp_path / "empty.txt"), "SHORT": str(tmp_path / "short.txt"),
           "MISSING": str(tmp_path / "nope.txt"), "P": str(tmp_path / "p.json")}
    args = [sub.get(a, a) for a in args]
    r = subprocess.run([sys.executable, "-m", "tools.importance", "--model", str(STORIES), "--samples", "2",
                        "--seq-len", "64", "--out", str(tmp_path / "s.json")] + args, capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p.json").exists()


def test_similarity_report_writes_csv_and_png(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tools.similarity", "--model", str(STORIES), "--calib", str(WIKITEXT2),
                        "--samples", "2", "--seq-len", "64", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "similarity.csv").read_text().splitlines()
    assert len(rows) == 6 and rows[0].startswith("layer,block_similarity")
    assert (tmp_path / "similarity.png").read_bytes()[:4] == b"\x89PNG"


def test_iterative_rescoring_drops_one_at_a_time():
    from tools.importance import run

    _, scores, one_shot = run(str(STORIES), WIKITEXT2, 2, 64, drop="attention:2", progress=False)
    _, _, iterative = run(str(STORIES), WIKITEXT2, 2, 64, drop="attention:2", iterative=True, progress=False)
    imp = importance(scores)["attention"]
    first = min(range(5), key=lambda i: imp[i])
    assert len(iterative["attention"]) == 2 and first in iterative["attention"] and first in one_shot["attention"]
