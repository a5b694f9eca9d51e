"""Greedy plan search: its first step is the brute-force best single removal; budgets and bad input."""

import json
import subprocess
import sys

import pytest
import torch.nn.functional as F

import runtime
from bench.hf_reference import STORIES
from tools.calib import token_windows
from tools import search_plan
from tools.search_plan import Scorer, candidates, greedy, main, parse_budget
from model.errors import UserError
from runtime.plan import load_plan

TINYSTORIES = STORIES.parents[1] / "data" / "tinystories" / "validation_head.txt"


@pytest.fixture(scope="module")
def scorer():
    engine = runtime.load(STORIES, dtype="float32", compile=False, show_progress=False)
    windows = token_windows(engine.tokenizer, TINYSTORIES, 64, 4)
    return Scorer(engine, windows, "kl", batch_size=2)


def brute_force_kl(plan, windows, full_logp) -> float:
    """KL(full || plan) per token, ``plan`` loaded on its own (no weights shared with the scorer's engine)."""
    sub = runtime.load(STORIES, plan=plan, dtype="float32", compile=False, show_progress=False)
    q = F.log_softmax(sub.logits(windows), -1)
    return (full_logp.exp() * (full_logp - q)).sum(-1).mean().item()


@pytest.mark.parametrize("kind", ["attention", "mlp", "joint"])
def test_first_step_is_brute_force_best(scorer, kind):
    L = scorer.engine.config.num_layers
    full = runtime.load(STORIES, dtype="float32", compile=False, show_progress=False)
    full_logp = F.log_softmax(full.logits(scorer.windows), -1)
    brute = {move: brute_force_kl(_single(move), scorer.windows, full_logp) for move in candidates(set(), set(), kind, L)}
    best = min(brute, key=brute.get)
    plan, steps = greedy(scorer, None, kind, 1, progress=False)
    assert steps[0]["remove"] == f"{best[0]} {best[1]}"
    assert steps[0]["score"] == pytest.approx(brute[best], rel=1e-4, abs=1e-7)
    # and it is a strict choice, not a tie decided by order
    others = sorted(v for m, v in brute.items() if m != best)
    assert others[0] > brute[best]


def _single(move):
    kind, layer = move
    return {"version": 1, "drop": {kind: [layer]}}


def test_greedy_reaches_budget_and_extends_start_plan(scorer):
    plan, steps = greedy(scorer, {"version": 1, "drop": {"attention": [1]}}, "attention", 3, progress=False)
    assert 1 in plan["drop"]["attention"] and len(plan["drop"]["attention"]) == 3 and len(steps) == 2
    scores = [s["score"] for s in steps]
    assert scores == sorted(scores)  # removing more never brings the output closer here


def test_shortlist_rescores_only_the_best_of_the_step_before(scorer):
    L = scorer.engine.config.num_layers
    full_plan, full_steps = greedy(scorer, None, "joint", 3, progress=False)
    wide_plan, wide_steps = greedy(scorer, None, "joint", 3, shortlist=2 * L, progress=False)
    assert wide_plan == full_plan and [s["remove"] for s in wide_steps] == [s["remove"] for s in full_steps]
    _, first = greedy(scorer, None, "joint", 1, progress=False)
    one_plan, one_steps = greedy(scorer, None, "joint", 3, shortlist=1, progress=False)
    assert [s["scored"] for s in one_steps] == [2 * L, 1, 1]
    assert one_steps[0]["remove"] == first[0]["remove"]
    # with K = 1 the second removal is the runner-up of the first step
    ranked = [m for _, m in sorted((scorer(_single(m)), m) for m in candidates(set(), set(), "joint", L))]
    assert one_steps[1]["remove"] == f"{ranked[1][0]} {ranked[1][1]}"
    # and the third the best left by its last (first-step) score, not one never scored since
    assert one_steps[2]["remove"] == f"{ranked[2][0]} {ranked[2][1]}"
    with pytest.raises(UserError, match="--shortlist"):
        greedy(scorer, None, "joint", 2, shortlist=0, progress=False)


def test_cost_budget_stops_at_target_and_ranks_by_score_per_saving(scorer):
    L = scorer.engine.config.num_layers
    table = {"attention_ms": 1.0, "mlp_ms": 3.0, "fixed_ms": 2.0}
    step = search_plan.step_time(table, L)
    full = step(set(), set())
    budget = search_plan.Cost("joint", step, full / 1.5, "ms")
    plan, steps = greedy(scorer, None, "joint", budget, progress=False)
    p = load_plan(plan, L)
    assert step(set(p.drop_attention), set(p.drop_mlp)) <= full / 1.5
    # minimal: undoing the last removal misses the target
    kind, layer = steps[-1]["remove"].split()
    a, m = set(p.drop_attention), set(p.drop_mlp)
    (a if kind == "attention" else m).discard(int(layer))
    assert step(a, m) > full / 1.5
    # the first removal has the least KL per ms saved
    ratio = {mv: scorer(_single(mv)) / (1.0 if mv[0] == "attention" else 3.0) for mv in candidates(set(), set(), "joint", L)}
    best = min(ratio, key=ratio.get)
    assert steps[0]["remove"] == f"{best[0]} {best[1]}"


def test_step_cost_table_is_measured_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBLAYER_CACHE", str(tmp_path))
    table = search_plan.step_cost_table(STORIES, context=16, steps=4, compile=False, progress=False)
    assert table["full_ms"] > 0 and table["attention_ms"] >= 0 and table["mlp_ms"] >= 0
    assert set(table["measured_ms"]) == {"full", "no_attention", "no_mlp"}
    monkeypatch.setattr(runtime, "load", lambda *a, **k: pytest.fail("measured again"))
    assert search_plan.step_cost_table(STORIES, context=16, steps=4, compile=False, progress=False) == table


def test_cli_budget_bytes(tmp_path):
    from runtime.schedule import compile_plan
    from model.config import load_config

    config = load_config(STORIES)
    full = compile_plan(load_plan(None, 5), config).weight_bytes(4)
    out = tmp_path / "bytes.json"
    assert main(["--model", str(STORIES), "--budget-bytes", str(int(full * 0.9)), "--kind", "mlp", "--calib",
                 str(TINYSTORIES), "--samples", "2", "--seq-len", "32", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert compile_plan(load_plan(plan, 5), config).weight_bytes(4) <= full * 0.9
    assert plan["drop"]["mlp"] and not plan["drop"]["attention"] and plan["source"]["kind"] == "mlp"


def test_block_moves_become_blocks(scorer):
    plan, _ = greedy(scorer, None, "block", 2, progress=False)
    assert len(plan["drop"]["block"]) == 2 and not plan["drop"]["attention"] and not plan["drop"]["mlp"]


def test_budget_errors(scorer):
    with pytest.raises(UserError, match="between 1 and 5"):
        parse_budget("attention:6", 5)
    with pytest.raises(UserError, match="unknown kind"):
        parse_budget("heads:2", 5)
    with pytest.raises(UserError, match="already drops 2 attention"):
        greedy(scorer, {"version": 1, "drop": {"attention": [0, 1]}}, "attention", 2, progress=False)


def test_cli_writes_plan_with_log(tmp_path):
    out = tmp_path / "kl-attn2.json"
    r = subprocess.run([sys.executable, "-m", "tools.search_plan", "--model", str(STORIES), "--drop", "attention:2",
                        "--calib", str(TINYSTORIES), "--samples", "2", "--seq-len", "64", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    assert len(plan["drop"]["attention"]) == 2
    src = plan["source"]
    assert src["tool"] == "tools.search_plan" and src["metric"] == "kl" and len(src["steps"]) == 2
    assert sorted(int(s["remove"].split()[1]) for s in src["steps"]) == plan["drop"]["attention"]
    assert "step 1: remove attention" in r.stderr
    runtime.load(STORIES, plan=str(out), show_progress=False)  # it loads


@pytest.mark.parametrize("args, message", [
    (["--drop", "attention:9"], "between 1 and 5"),
    (["--drop", "heads:1"], "unknown kind"),
    (["--drop", "attention:1", "--plan", "attn66"], "already drops 2 attention"),
    (["--drop", "attention:1", "--samples", "100000"], "windows"),
    ([], "exactly one of --drop, --target-speedup, --budget-bytes (got none)"),
    (["--drop", "attention:1", "--budget-bytes", "1000"], "(got --drop, --budget-bytes)"),
    (["--target-speedup", "0.5"], "--target-speedup: expected a number above 1"),
    (["--budget-bytes", "1e12"], "--budget-bytes: expected a number between 0"),
])
def test_cli_bad_input(tmp_path, capsys, args, message):
    code = main(["--model", str(STORIES), "--calib", str(TINYSTORIES), "--seq-len", "64",
                 "--out", str(tmp_path / "p.json"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "p.json").exists()


def test_wikitext_calibration_stays_in_first_half(tmp_path, monkeypatch, scorer):
    text = tmp_path / "wiki.txt"
    text.write_text(TINYSTORIES.read_text()[:20000])
    monkeypatch.setattr(search_plan, "WIKITEXT2", text)
    n = len(token_windows(scorer.engine.tokenizer, text, 64))
    assert len(search_plan.calibration_windows(scorer.engine.tokenizer, text, n // 2, 64)) == n // 2
    with pytest.raises(UserError, match="held out"):
        search_plan.calibration_windows(scorer.engine.tokenizer, text, n // 2 + 1, 64)


def test_ppl_metric_is_perplexity(scorer):
    ppl = Scorer(scorer.engine, scorer.windows, "ppl", batch_size=2)
    plan = _single(("mlp", 2))
    sub = runtime.load(STORIES, plan=plan, dtype="float32", compile=False, show_progress=False)
    logits = sub.logits(scorer.windows)[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), scorer.windows[:, 1:].reshape(-1)).exp().item()
    assert ppl(plan) == pytest.approx(ref, rel=1e-5)
