"""Plan parsing and resolution: presets, rules, explicit drops, and clear errors (property-based too)."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import load_config
from runtime.schedule import AttentionStep, MlpStep, compile_plan
from runtime.plan import KINDS, PLANS_DIR, PlanError, load_plan, preset_plans, resolve_plan, rule_count
from bench.hf_reference import STORIES


@pytest.mark.parametrize("L, ks", [(30, (3, 8, 10)), (32, (3, 8, 11)), (5, (1, 1, 2))])
def test_preset_counts(L, ks):
    for suffix, k in zip(("90", "75", "66"), ks):
        p = load_plan(f"attn{suffix}", L)
        assert p.drop_attention == set(range(L - k, L)) and not p.drop_mlp
        kl = load_plan(f"block{suffix}-keeplast", L)
        assert kl.drop_attention == kl.drop_mlp == set(range(L - 1 - k, L - 1))


def test_checked_in_presets_equal_the_generated_ones():
    files = {p.stem: json.loads(p.read_text()) for p in PLANS_DIR.glob("*.json")}
    presets = preset_plans()
    assert len(presets) == 19
    for name, spec in presets.items():
        assert files[name] == spec
        assert load_plan(PLANS_DIR / f"{name}.json", 30) == load_plan(name, 30)


def test_explicit_drop_and_block():
    p = resolve_plan({"version": 1, "drop": {"attention": [0, 3], "mlp": [1], "block": [4]}}, 5)
    assert p.drop_attention == {0, 3, 4} and p.drop_mlp == {1, 4}
    s = compile_plan(p, load_config(STORIES))
    assert s.steps == (MlpStep(0), AttentionStep(1, 0), AttentionStep(2, 1), MlpStep(2), MlpStep(3))
    assert s.num_kv_slots == 2


BAD = [
    ([], "expected a JSON object"),
    ({"drop": {}}, "'version' must be 1"),
    ({"version": 2, "drop": {}}, "'version' must be 1"),
    ({"version": 1}, "exactly one of 'rule' or 'drop'"),
    ({"version": 1, "drop": {}, "rule": {"kind": "mlp", "fraction": 0.1}}, "exactly one"),
    ({"version": 1, "drop": {}, "extra": 1}, r"unknown field\(s\) \['extra'\]"),
    ({"version": 1, "drop": {"attn": [1]}}, r"unknown field\(s\) \['attn'\] in 'drop'"),
    ({"version": 1, "drop": {"attention": [5]}}, r"'drop.attention' has layer 5, expected 0..4"),
    ({"version": 1, "drop": {"attention": [-1]}}, "has layer -1"),
    ({"version": 1, "drop": {"mlp": [1, 1]}}, r"'drop.mlp' lists layer\(s\) \[1\] more than once"),
    ({"version": 1, "drop": {"mlp": ["1"]}}, "'drop.mlp' must hold integers"),
    ({"version": 1, "drop": {"mlp": [True]}}, "'drop.mlp' must hold integers"),
    ({"version": 1, "drop": {"mlp": 1}}, "'drop.mlp' must be a list"),
    ({"version": 1, "drop": {"block": [2], "attention": [2]}}, r"\[2\] are in 'drop.block' and also in 'drop.attention'"),
    ({"version": 1, "rule": {"kind": "ffn", "fraction": 0.1}}, "'rule.kind' must be one of"),
    ({"version": 1, "rule": {"kind": "mlp", "fraction": 0}}, r"'rule.fraction' must be a number in \(0, 1\]"),
    ({"version": 1, "rule": {"kind": "mlp", "fraction": "0.5"}}, "'rule.fraction'"),
    ({"version": 1, "rule": {"kind": "mlp", "fraction": 0.5, "keep_last": "yes"}}, "'rule.keep_last'"),
    ({"version": 1, "rule": {"kind": "mlp", "fraction": 1.0, "keep_last": True}}, "only 4 to drop with keep_last"),
    ({"version": 1, "rule": {"kind": "mlp", "fraction": 0.5, "k": 3}}, r"unknown field\(s\) \['k'\] in 'rule'"),
    ({"version": 1, "name": 3, "drop": {}}, "'name' must be a string"),
]


@pytest.mark.parametrize("raw, message", BAD)
def test_invalid_plans_name_the_field(raw, message):
    with pytest.raises(PlanError, match=message):
        resolve_plan(raw, 5)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(PlanError, match=f"{bad}: not readable JSON"):
        load_plan(str(bad), 5)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"version": 1, "drop": {"mlp": [9]}}))
    with pytest.raises(PlanError, match=f"{wrong}: field 'drop.mlp' has layer 9"):
        load_plan(str(wrong), 5)
    with pytest.raises(PlanError, match="not a preset name"):
        load_plan("attn67", 5)


def test_checked_in_plans_load_by_name():
    assert load_plan("imp-attn10", 30) == load_plan(PLANS_DIR / "imp-attn10.json", 30)
    assert load_plan("imp-attn10", 30).name == "imp-attn10"


def test_cli_bad_plan_exits_cleanly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "drop": {"attention": [7]}}))
    r = subprocess.run([sys.executable, "-m", "runtime.generate", "--model", str(STORIES), "--plan", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}: field 'drop.attention' has layer 7, expected 0..4" in r.stderr and r.stdout == ""


# ---- property-based ---------------------------------------------------------------------------

layer_counts = st.integers(1, 48)


@st.composite
def valid_plans(draw):
    L = draw(layer_counts)
    if draw(st.booleans()):
        keep_last = draw(st.booleans()) and L > 1
        # fractions small enough that k fits
        room = L - 1 if keep_last else L
        fraction = draw(st.floats(min_value=1e-3, max_value=1.0).filter(lambda f: rule_count(L, f) <= room))
        kind = draw(st.sampled_from(KINDS))
        return L, {"version": 1, "rule": {"kind": kind, "fraction": fraction, "keep_last": keep_last}}
    layers = list(range(L))
    block = draw(st.lists(st.sampled_from(layers), unique=True, max_size=L))
    rest = [i for i in layers if i not in block]
    drop = {"block": block}
    for kind in ("attention", "mlp"):
        if rest:
            drop[kind] = draw(st.lists(st.sampled_from(rest), unique=True, max_size=len(rest)))
    return L, {"version": 1, "drop": drop}


@settings(max_examples=300, deadline=None)
@given(valid_plans())
def test_random_valid_plans_resolve_and_compile(case):
    L, raw = case
    plan = resolve_plan(raw, L)
    from model.config import parse_config
    cfg = parse_config({"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": L,
                        "intermediate_size": 16, "vocab_size": 10})
    s = compile_plan(plan, cfg)
    attn = [st_.layer for st_ in s.steps if isinstance(st_, AttentionStep)]
    mlp = [st_.layer for st_ in s.steps if isinstance(st_, MlpStep)]
    assert attn == plan.kept_attention and mlp == plan.kept_mlp
    assert [st_.slot for st_ in s.steps if isinstance(st_, AttentionStep)] == list(range(s.num_kv_slots))
    if "rule" in raw:
        k = rule_count(L, raw["rule"]["fraction"])
        dropped = plan.drop_attention | plan.drop_mlp
        assert len(dropped) == k
        assert max(dropped) == (L - 2 if raw["rule"]["keep_last"] else L - 1)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 60) | st.floats(allow_nan=False)
                           | st.text(max_size=5),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


@st.composite
def mutated_plans(draw):
    """Valid plans with one field replaced by junk, plus arbitrary JSON: resolve or raise PlanError only."""
    L, raw = draw(valid_plans())
    raw = json.loads(json.dumps(raw))
    target = draw(st.sampled_from(["top", "inner", "whole"]))
    junk = draw(json_values)
    if target == "whole":
        return L, junk
    if target == "top":
        raw[draw(st.sampled_from(["version", "rule", "drop", "name", "source", "bogus"]))] = junk
    else:
        inner = raw.get("rule", raw.get("drop"))
        inner[draw(st.sampled_from(["kind", "fraction", "keep_last", "attention", "mlp", "block", "x"]))] = junk
    return L, raw


@settings(max_examples=500, deadline=None)
@given(mutated_plans())
def test_random_invalid_plans_raise_only_plan_error(case):
    L, raw = case
    try:
        plan = resolve_plan(raw, L)
    except PlanError as e:
        assert str(e).startswith("plan: ")
        return
    assert plan.drop_attention <= set(range(L)) and plan.drop_mlp <= set(range(L))
