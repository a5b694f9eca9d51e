"""``python -m tools.search_plan``: choose what to drop by its measured effect on the model's output.

Greedy, as FinerCut does: starting from ``--plan`` (default ``full``), each step tries removing every
remaining candidate sublayer, scores the resulting model on a few calibration windows, and removes
the best one, until ``--drop KIND:N`` holds (N in total for that kind, the start plan's drops included).
``--shortlist K`` makes it cheaper: after the first step only the K best by their last score are scored.
Instead of a count, ``--target-speedup X`` (a decode step predicted X times faster, from a per-sublayer
step-time table measured once per model, dtype and machine: on CPU a kept attention costs far more than
its bytes) or ``--budget-bytes B`` (kept weights) stop the search; then each step removes the candidate
with the least score increase per millisecond (or byte) it saves.

    python -m tools.search_plan --drop attention:10 --out plans/kl-attn10.json

Scores (lower is better): ``kl`` = KL(full model || candidate) of the next-token distributions, mean
over every token of the windows (the full model's log-probabilities are computed once and reused);
``ppl`` = the candidate's perplexity on the windows. Candidates run through ``Engine.with_plan`` on
one loaded model (no weight copies). Kinds: ``attention``, ``mlp``, ``block`` (both sublayers of a
layer), ``joint`` (attention and MLP sublayers ranked together; N counts sublayers).

Calibration is the first half of WikiText-2 test by tokens (the second half is the held-out
evaluation, ``tools.perplexity --start-fraction 0.5``): windows past the middle are refused.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.errors import UserError, cli_main
from tools.calib import WIKITEXT2, token_windows
from tools.importance import parse_drop

KINDS = ("attention", "mlp", "block", "joint")
METRICS = ("kl", "ppl")


def parse_budget(text: str, num_layers: int) -> tuple[str, int]:
    """'KIND:N' -> (kind, N); N is the total of that kind the final plan drops."""
    return parse_drop(text, num_layers, KINDS)


def _dropped(attention: set, mlp: set, kind: str) -> int:
    if kind == "attention":
        return len(attention)
    if kind == "mlp":
        return len(mlp)
    if kind == "block":
        return len(attention & mlp)
    return len(attention) + len(mlp)


def candidates(attention: set, mlp: set, kind: str, num_layers: int) -> list[tuple[str, int]]:
    """(kind, layer) moves still possible: 'attention'/'mlp' drop one sublayer, 'block' both."""
    out = []
    for layer in range(num_layers):
        if kind in ("attention", "joint") and layer not in attention:
            out.append(("attention", layer))
        if kind in ("mlp", "joint") and layer not in mlp:
            out.append(("mlp", layer))
        if kind == "block" and not (layer in attention and layer in mlp):
            out.append(("block", layer))
    return out


def plan_dict(attention: set, mlp: set, name: str = "candidate") -> dict:
    blocks = attention & mlp
    return {"version": 1, "name": name, "drop": {"attention": sorted(attention - blocks),
                                                 "mlp": sorted(mlp - blocks), "block": sorted(blocks)}}


def apply(attention: set, mlp: set, move: tuple[str, int]) -> tuple[set, set]:
    kind, layer = move
    a, m = set(attention), set(mlp)
    if kind in ("attention", "block"):
        a.add(layer)
    if kind in ("mlp", "block"):
        m.add(layer)
    return a, m


class Scorer:
    """Scores plans on fixed windows [N, T] against the full engine's log-probabilities (kept once)."""

    def __init__(self, engine, windows: torch.Tensor, metric: str = "kl", batch_size: int = 4):
        if metric not in METRICS:
            raise UserError(f"--metric: expected one of {', '.join(METRICS)}, got {metric!r}")
        self.engine, self.windows, self.metric, self.batch_size = engine, windows, metric, batch_size
        self.teacher = [F.log_softmax(engine.logits(b), -1) for b in windows.split(batch_size)] if metric == "kl" else None

    @torch.inference_mode()
    def __call__(self, plan) -> float:
        sub = self.engine.with_plan(plan)
        total, count = 0.0, 0
        for i, batch in enumerate(self.windows.split(self.batch_size)):
            logp = F.log_softmax(sub.logits(batch), -1)  # [B, T, V]
            if self.metric == "kl":
                t = self.teacher[i]
                total += (t.exp() * (t - logp)).sum().item()
                count += batch.numel()
            else:
                total += F.nll_loss(logp[:, :-1].reshape(-1, logp.shape[-1]), batch[:, 1:].reshape(-1),
                                    reduction="sum").item()
                count += batch[:, 1:].numel()
        mean = total / count
        return mean if self.metric == "kl" else float(torch.tensor(mean).exp())


class Count:
    """--drop KIND:N: stop when N sublayers of ``kind`` are dropped; candidates ranked by score alone."""

    def __init__(self, kind: str, n: int):
        self.kind, self.n = kind, n

    def met(self, attention: set, mlp: set) -> bool:
        return _dropped(attention, mlp, self.kind) >= self.n

    def saving(self, attention: set, mlp: set, move) -> float | None:
        return None

    def describe(self, attention: set, mlp: set) -> str:
        return f"{_dropped(attention, mlp, self.kind)} of {self.n} {self.kind} sublayers dropped"


class Cost:
    """--target-speedup X or --budget-bytes B: stop when the plan's predicted decode step is X times
    faster than the full model's, or its weights fit in B bytes. ``cost(attention, mlp)`` is the plan's
    step time or bytes; candidates are ranked by score increase per unit of cost they save (the
    speed-for-quality trade, as Puzzle's knapsack ranks blocks)."""

    def __init__(self, kind: str, cost, target: float, what: str):
        self.kind, self.cost, self.target, self.what = kind, cost, target, what

    def met(self, attention: set, mlp: set) -> bool:
        return self.cost(attention, mlp) <= self.target

    def saving(self, attention: set, mlp: set, move) -> float:
        return self.cost(attention, mlp) - self.cost(*apply(attention, mlp, move))

    def describe(self, attention: set, mlp: set) -> str:
        return f"{self.what} {self.cost(attention, mlp):.4g} (target {self.target:.4g})"


def step_time(table: dict, num_layers: int):
    """(attention, mlp) -> predicted decode step ms from a cost table (``step_cost_table``)."""
    def cost(attention: set, mlp: set) -> float:
        return (table["fixed_ms"] + (num_layers - len(attention)) * table["attention_ms"]
                + (num_layers - len(mlp)) * table["mlp_ms"])
    return cost


def weight_bytes(config, elem: int):
    """(attention, mlp) -> bytes of the weights a plan keeps (``Schedule.weight_bytes``)."""
    from runtime.plan import load_plan
    from runtime.schedule import compile_plan

    def cost(attention: set, mlp: set) -> float:
        return compile_plan(load_plan(plan_dict(attention, mlp), config.num_layers), config).weight_bytes(elem)
    return cost


def step_cost_table(checkpoint, dtype: str = "float32", context: int = 256, batch: int = 1, steps: int = 24,
                    compile: bool = True, progress: bool = True) -> dict:
    """Decode step ms of one attention sublayer, one MLP sublayer and the rest (embedding, final norm,
    head), measured once per model, dtype, context, batch, thread count and CPU, and cached under
    ``~/.cache/sublayer/step-costs/``. Measured as the median step of three plans (full, every attention
    dropped, every MLP dropped; all layers have the same shapes, so each sublayer costs the same):
    attention_ms = (full - no attention) / L, mlp_ms = (full - no MLP) / L, fixed = full - L (a + m)."""
    import hashlib
    import platform
    import statistics

    import runtime
    from model.config import load_config
    from model.default_model import cache_root
    from tools.heal_data import sha256_file

    checkpoint = Path(checkpoint)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    key = {"model": checkpoint.name, "config": sha256_file(checkpoint / "config.json"), "dtype": dtype,
           "context": context, "batch": batch, "threads": torch.get_num_threads(), "cpu": cpu,
           "torch": torch.__version__, "compile": compile}
    path = cache_root() / "step-costs" / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    if path.is_file():
        return json.loads(path.read_text())
    L = load_config(checkpoint).num_layers
    every = list(range(L))
    medians = {}
    for name, plan in (("full", None), ("no_attention", {"version": 1, "drop": {"attention": every}}),
                       ("no_mlp", {"version": 1, "drop": {"mlp": every}})):
        engine = runtime.load(checkpoint, plan=plan, dtype=dtype, max_seq_len=context + steps + 2,
                              show_progress=False, compile=compile)
        cache = engine.own_cache(batch, engine.max_seq_len)
        kv0 = torch.zeros(batch, dtype=torch.int32)
        tok = torch.ones(batch, 1, dtype=torch.long)
        times = []
        with torch.inference_mode():
            for i in range(steps + 2):  # the first two compile / warm up
                t0 = time.perf_counter()
                engine.decode_step(tok, cache, torch.full((batch,), context + i), kv0)
                times.append(time.perf_counter() - t0)
        medians[name] = statistics.median(times[2:]) * 1e3
        if progress:
            print(f"step costs: {name} {medians[name]:.2f} ms", file=sys.stderr)
    a = (medians["full"] - medians["no_attention"]) / L
    m = (medians["full"] - medians["no_mlp"]) / L
    table = dict(key, full_ms=medians["full"], attention_ms=max(a, 0.0), mlp_ms=max(m, 0.0),
                 fixed_ms=max(medians["full"] - L * (a + m), 0.0), measured_ms=medians)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)
    return table


def greedy(scorer: Scorer, start, kind: str, budget, shortlist: int | None = None, progress: bool = True,
           log=None) -> tuple[dict, list[dict]]:
    """Remove sublayers of ``kind`` one at a time until ``budget`` is met (an int N: N of ``kind`` dropped,
    or a ``Cost``). Returns (plan dict, steps), steps = [{"remove": "attention 7", "score": float,
    "seconds": float, "scored": int}]. Under a count the best candidate has the lowest score; under a
    ``Cost``, the lowest score increase per unit of cost saved.

    shortlist K: the first step scores every candidate; each later step scores only the K candidates
    that ranked best when last scored (a lazy greedy: removing one sublayer seldom reorders the
    others' effects by much), so a search costs about C + (n-1) K candidates instead of ~n C."""
    from runtime.plan import load_plan

    if shortlist is not None and shortlist < 1:
        raise UserError(f"--shortlist: expected a positive integer, got {shortlist}")
    if isinstance(budget, int):
        budget = Count(kind, budget)
    L = scorer.engine.config.num_layers
    p = load_plan(start, L)
    attention, mlp = set(p.drop_attention), set(p.drop_mlp)
    if isinstance(budget, Count) and budget.met(attention, mlp):
        have = _dropped(attention, mlp, kind)
        raise UserError(f"--plan {p.name!r} already drops {have} {kind} sublayer(s); --drop {kind}:{budget.n} asks "
                        f"for {budget.n} in total, so there is nothing left to search")
    if budget.met(attention, mlp):
        raise UserError(f"--plan {p.name!r} already meets the budget ({budget.describe(attention, mlp)}), "
                        f"so there is nothing left to search")
    current = 0.0 if isinstance(budget, Count) else scorer(plan_dict(attention, mlp))
    steps, known = [], {}  # known: {move: rank value when it was last scored}
    if isinstance(budget, Count):
        per_step = [len(candidates(attention, mlp, kind, L)) - s for s in range(budget.n - _dropped(attention, mlp, kind))]
        if shortlist is not None:
            per_step = per_step[:1] + [min(shortlist, c) for c in per_step[1:]]
        total = sum(per_step)
    else:
        total = None
    bar = tqdm(total=total, desc="search", unit="candidate", disable=not progress, file=sys.stderr)
    while not budget.met(attention, mlp):
        t0 = time.perf_counter()
        moves = candidates(attention, mlp, kind, L)
        if not moves:
            raise UserError(f"{budget.describe(attention, mlp)}: no {kind} candidates left to drop")
        if shortlist is not None and known:
            moves = sorted(moves, key=lambda m: (known.get(m, float("inf")), m))[:shortlist]
        scores, rank = {}, {}
        for move in moves:
            scores[move] = scorer(plan_dict(*apply(attention, mlp, move)))
            saved = budget.saving(attention, mlp, move)
            rank[move] = scores[move] if saved is None else (scores[move] - current) / max(saved, 1e-12)
            bar.update(1)
        move = min(rank, key=lambda m: (rank[m], m))
        score = scores[move]
        rank.pop(move)
        known.update(rank)
        current = score
        attention, mlp = apply(attention, mlp, move)
        step = {"remove": f"{move[0]} {move[1]}", "score": score, "seconds": round(time.perf_counter() - t0, 1),
                "scored": len(moves)}
        steps.append(step)
        bar.set_postfix(last=step["remove"], score=f"{score:.4g}")
        if log is not None:
            print(f"step {len(steps)}: remove {step['remove']}  {scorer.metric} {score:.6g}  "
                  f"({len(moves)} candidates, {step['seconds']} s; {budget.describe(attention, mlp)})",
                  file=log, flush=True)
    bar.close()
    return plan_dict(attention, mlp), steps


def calibration_windows(tokenizer, calib, samples: int, seq_len: int) -> torch.Tensor:
    """[samples, seq_len] windows from the start of ``calib``; on WikiText-2 test they must lie in its
    first half by tokens (the second half is the held-out evaluation)."""
    if Path(calib).resolve() != WIKITEXT2.resolve():
        return token_windows(tokenizer, calib, seq_len, samples)
    if samples < 1:
        raise UserError(f"--samples: expected at least 1, got {samples}")
    windows = token_windows(tokenizer, calib, seq_len)  # every whole window: the text is tokenised once
    if samples > len(windows) // 2:
        raise UserError(f"--samples {samples} x --seq-len {seq_len} reaches past the first half of {calib} "
                        f"({len(windows) // 2} windows): the second half is held out for evaluation")
    return windows[:samples]


def _portable(path) -> str:
    """``path`` relative to the repository root when it can be (no home directory in committed plans)."""
    import os

    return os.path.relpath(os.path.abspath(path), Path(__file__).resolve().parents[1])  # ../shared stays ../shared


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.search_plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory or known name (default: SmolLM2)")
    p.add_argument("--plan", default=None, help="start plan (default: full)")
    p.add_argument("--drop", default=None, help="KIND:N, KIND in " + ", ".join(KINDS))
    p.add_argument("--target-speedup", type=float, default=None, metavar="X",
                   help="drop --kind sublayers until the decode step is predicted X times faster than full's "
                        "(a per-sublayer step-time table measured once per model, dtype and machine)")
    p.add_argument("--budget-bytes", type=float, default=None, metavar="B",
                   help="drop --kind sublayers until the kept weights fit in B bytes (at --dtype)")
    p.add_argument("--kind", default="joint", choices=KINDS, help="what --target-speedup/--budget-bytes may drop")
    p.add_argument("--cost-context", type=int, default=256, help="cached positions the step-time table is measured at")
    p.add_argument("--metric", default="kl", choices=METRICS)
    p.add_argument("--calib", default=str(WIKITEXT2), help="plain text or JSONL (default: WikiText-2 test, first half)")
    p.add_argument("--samples", type=int, default=4, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--shortlist", type=int, default=None, metavar="K",
                   help="after the first step, score only the K candidates with the best last score")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", required=True, help="plan JSON to write")
    args = p.parse_args(argv)
    import runtime
    from model.default_model import DEFAULT_MODEL
    from model.config import load_config
    from model.default_model import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise UserError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    out = Path(args.out)
    if out.exists():
        raise UserError(f"--out {out}: already exists; remove it or choose another path")
    budgets = [f for f, v in (("--drop", args.drop), ("--target-speedup", args.target_speedup),
                              ("--budget-bytes", args.budget_bytes)) if v is not None]
    if len(budgets) != 1:
        raise UserError(f"give exactly one of --drop, --target-speedup, --budget-bytes (got {', '.join(budgets) or 'none'})")
    checkpoint = resolve_model(args.model)
    config = load_config(checkpoint)
    t0 = time.perf_counter()
    cost_table = None
    if args.drop is not None:
        kind, budget = parse_budget(args.drop, config.num_layers)
    elif args.target_speedup is not None:
        kind = args.kind
        if not args.target_speedup > 1:
            raise UserError(f"--target-speedup: expected a number above 1, got {args.target_speedup}")
        cost_table = step_cost_table(checkpoint, args.dtype, args.cost_context)
        step = step_time(cost_table, config.num_layers)
        budget = Cost(kind, step, step(set(), set()) / args.target_speedup, "predicted step ms")
        print(f"step costs (ms): attention {cost_table['attention_ms']:.3f}, mlp {cost_table['mlp_ms']:.3f}, "
              f"rest {cost_table['fixed_ms']:.3f}; full {step(set(), set()):.2f}", file=sys.stderr)
    else:
        kind = args.kind
        elem = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
        size = weight_bytes(config, elem)
        if not 0 < args.budget_bytes < size(set(), set()):
            raise UserError(f"--budget-bytes: expected a number between 0 and the full model's "
                            f"{size(set(), set())} bytes, got {args.budget_bytes:g}")
        budget = Cost(kind, size, args.budget_bytes, "weight bytes")
    engine = runtime.load(checkpoint, dtype=args.dtype, device=args.device, compile=False)
    windows = calibration_windows(engine.tokenizer, args.calib, args.samples, args.seq_len)
    scorer = Scorer(engine, windows, args.metric, args.batch_size)
    drop_plan, steps = greedy(scorer, args.plan, kind, budget, args.shortlist, log=sys.stderr)
    wall = time.perf_counter() - t0
    plan = {"version": 1, "name": out.stem,
            "description": f"greedy search ({budgets[0]} {args.drop or f'{args.target_speedup or args.budget_bytes:g}'}): "
                           f"the sublayers whose removal changes the output least ({args.metric} against the full model)",
            "drop": drop_plan["drop"],
            "source": {"tool": "tools.search_plan", "model": args.model or DEFAULT_MODEL, "calib": _portable(args.calib),
                       "samples": args.samples, "seq_len": args.seq_len, "metric": args.metric,
                       "shortlist": args.shortlist,
                       "start_plan": args.plan or "full", "drop": args.drop, "kind": kind,
                       "target_speedup": args.target_speedup, "budget_bytes": args.budget_bytes,
                       "step_costs_ms": None if cost_table is None else
                       {k: round(cost_table[k], 4) for k in ("attention_ms", "mlp_ms", "fixed_ms", "full_ms")},
                       "dtype": args.dtype,
                       "wall_s": round(wall, 1), "steps": steps}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(plan, indent=2) + "\n")
    tmp.replace(out)
    print(f"plan: {out}: {json.dumps(plan['drop'])}", file=sys.stderr)
    print(f"search: {wall:.1f} s wall", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
