"""Layer-drop plans: a versioned JSON schema, the presets, validation and resolution against a depth.

Two forms (``version`` 1, exactly one of ``rule`` / ``drop``; unknown keys are an error):

    {"version": 1, "name": "attn66", "rule": {"kind": "attention", "fraction": 0.333.., "keep_last": false}}
    {"version": 1, "name": "imp", "drop": {"attention": [5, 9], "mlp": [3], "block": []}, "source": {...}}

A rule drops the sublayer ``kind`` of the last k layers (``keep_last``: the k before the very last
layer), k = max(1, floor(L * fraction + 0.5)). ``block`` drops attention and MLP together.
"""

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from model.config import shown
from model.errors import UserError, read_json

KINDS = ("attention", "mlp", "block")
_TOP_KEYS = {"version", "name", "description", "source", "rule", "drop"}
_RULE_KEYS = {"kind", "fraction", "keep_last"}
PLANS_DIR = Path(__file__).resolve().parent.parent / "plans"

_PRESET_FRACTIONS = {"90": 0.1, "75": 0.25, "66": 1 / 3}
_PRESET_KINDS = {"attn": "attention", "mlp": "mlp", "block": "block"}


class PlanError(UserError):
    """A plan file or object that does not follow the schema."""


def preset_plans() -> dict[str, dict]:
    """name -> plan object, for ``full`` and the papers' Figure-2 presets (and -keeplast variants)."""
    plans = {"full": {"version": 1, "name": "full", "description": "drop nothing", "drop": {}}}
    for prefix, kind in _PRESET_KINDS.items():
        for suffix, fraction in _PRESET_FRACTIONS.items():
            for keep_last in (False, True):
                name = f"{prefix}{suffix}" + ("-keeplast" if keep_last else "")
                what = f"the {kind} sublayer" if kind != "block" else "the whole block"
                where = "layers before the very last one" if keep_last else "last layers"
                plans[name] = {
                    "version": 1, "name": name,
                    "description": f"drop {what} of the max(1, round({fraction:.4g} * L)) {where}",
                    "rule": {"kind": kind, "fraction": fraction, "keep_last": keep_last},
                }
    return plans


@dataclass(frozen=True)
class Plan:
    """A resolved plan: which layers lose their attention and MLP sublayers, for a model of depth L."""

    num_layers: int
    drop_attention: frozenset[int]
    drop_mlp: frozenset[int]
    name: str = "unnamed"
    spec: dict = field(default_factory=dict, compare=False)

    @property
    def kept_attention(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.drop_attention]

    @property
    def kept_mlp(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.drop_mlp]

    def describe(self) -> str:
        """One line: what each layer lost, e.g. ``attn66: 10/30 attention dropped (20-29), 0/30 MLP dropped``."""
        def span(ids):
            return ",".join(str(i) for i in sorted(ids)) or "none"
        L = self.num_layers
        blocks = self.drop_attention & self.drop_mlp
        return (f"{self.name}: attention dropped in {len(self.drop_attention)}/{L} layers ({span(self.drop_attention)}); "
                f"MLP dropped in {len(self.drop_mlp)}/{L} layers ({span(self.drop_mlp)}); "
                f"whole blocks gone: {len(blocks)}")


def rule_count(num_layers: int, fraction: float) -> int:
    """k = max(1, floor(L * fraction + 0.5)): round half up, never zero."""
    return max(1, math.floor(num_layers * fraction + 0.5))


def load_plan(spec, num_layers: int) -> Plan:
    """Resolve a plan given as None (``full``), a preset name, a path to a JSON file, or a dict."""
    if spec is None:
        spec = "full"
    if isinstance(spec, Plan):
        if spec.num_layers != num_layers:
            raise PlanError(f"plan {spec.name!r} was resolved for {spec.num_layers} layers, the model has {num_layers}")
        return spec
    if isinstance(spec, dict):
        return resolve_plan(spec, num_layers, where="plan")
    spec = str(spec)
    presets = preset_plans()
    if not Path(spec).exists() and spec in presets:
        return resolve_plan(presets[spec], num_layers, where=f"preset {spec!r}")
    path = plan_file(spec)
    if path is None:
        raise PlanError(f"{spec}: no such plan file, and not a preset name (presets: {', '.join(presets)}; "
                        f"other plans in {PLANS_DIR} also load by name)")
    raw = read_json(path, PlanError)
    plan = resolve_plan(raw, num_layers, where=str(path))
    if plan.name == "unnamed":
        plan = Plan(plan.num_layers, plan.drop_attention, plan.drop_mlp, path.stem, plan.spec)
    return plan


def plan_file(spec) -> Path | None:
    """The file a plan spec names (a path, or a checked-in plan by name), or None (a dict, a preset)."""
    if spec is None or isinstance(spec, (dict, Plan)):
        return None
    path = Path(spec)
    if not path.exists() and (PLANS_DIR / f"{spec}.json").is_file():
        path = PLANS_DIR / f"{spec}.json"
    return path if path.is_file() else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def resolve_plan(raw, num_layers: int, where: str = "plan") -> Plan:
    """Validate a plan object and resolve it against a model of ``num_layers`` layers."""
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    if raw.get("version") != 1 or not _is_int(raw.get("version")):
        raise PlanError(f"{where}: field 'version' must be 1, got {shown(raw.get('version'))}")
    name = raw.get("name", "unnamed")
    if not isinstance(name, str):
        raise PlanError(f"{where}: field 'name' must be a string, got {shown(name)}")
    if "description" in raw and not isinstance(raw["description"], str):
        raise PlanError(f"{where}: field 'description' must be a string")
    if ("rule" in raw) == ("drop" in raw):
        raise PlanError(f"{where}: exactly one of 'rule' or 'drop' is required")
    if "rule" in raw:
        attn, mlp = _resolve_rule(raw["rule"], num_layers, where)
    else:
        attn, mlp = _resolve_drop(raw["drop"], num_layers, where)
    return Plan(num_layers, frozenset(attn), frozenset(mlp), name, raw)


def _resolve_rule(rule, L: int, where: str):
    if not isinstance(rule, dict):
        raise PlanError(f"{where}: field 'rule' must be an object")
    unknown = set(rule) - _RULE_KEYS
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {sorted(unknown)} in 'rule'; allowed: {sorted(_RULE_KEYS)}")
    kind = rule.get("kind")
    if kind not in KINDS:
        raise PlanError(f"{where}: field 'rule.kind' must be one of {list(KINDS)}, got {shown(kind)}")
    fraction = rule.get("fraction")
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise PlanError(f"{where}: field 'rule.fraction' must be a number in (0, 1], got {shown(fraction)}")
    keep_last = rule.get("keep_last", False)
    if not isinstance(keep_last, bool):
        raise PlanError(f"{where}: field 'rule.keep_last' must be true or false, got {shown(keep_last)}")
    k = rule_count(L, fraction)
    room = L - 1 if keep_last else L
    if k > room:
        raise PlanError(f"{where}: 'rule' drops {k} layers but a {L}-layer model has only {room} to drop"
                        + (" with keep_last" if keep_last else ""))
    end = L - 1 if keep_last else L
    layers = set(range(end - k, end))
    return (layers if kind in ("attention", "block") else set(),
            layers if kind in ("mlp", "block") else set())


def _resolve_drop(drop, L: int, where: str):
    if not isinstance(drop, dict):
        raise PlanError(f"{where}: field 'drop' must be an object")
    unknown = set(drop) - set(KINDS)
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {sorted(unknown)} in 'drop'; allowed: {list(KINDS)}")
    lists = {}
    for kind in KINDS:
        ids = drop.get(kind, [])
        if not isinstance(ids, list):
            raise PlanError(f"{where}: field 'drop.{kind}' must be a list of layer indices")
        for i in ids:
            if not _is_int(i):
                raise PlanError(f"{where}: field 'drop.{kind}' must hold integers, got {shown(i)}")
            if not 0 <= i < L:
                raise PlanError(f"{where}: field 'drop.{kind}' has layer {i}, expected 0..{L - 1} for a {L}-layer model")
        if len(set(ids)) != len(ids):
            dups = sorted(i for i, n in Counter(ids).items() if n > 1)
            raise PlanError(f"{where}: field 'drop.{kind}' lists layer(s) {dups} more than once")
        lists[kind] = set(ids)
    for kind in ("attention", "mlp"):
        both = lists["block"] & lists[kind]
        if both:
            raise PlanError(f"{where}: layer(s) {sorted(both)} are in 'drop.block' and also in 'drop.{kind}'")
    return lists["attention"] | lists["block"], lists["mlp"] | lists["block"]


def write_presets(out_dir=PLANS_DIR):
    """(Re)write the checked-in preset files: ``python -m runtime.plan``."""
    for name, spec in preset_plans().items():
        (Path(out_dir) / f"{name}.json").write_text(json.dumps(spec, indent=2) + "\n")


if __name__ == "__main__":
    write_presets()
