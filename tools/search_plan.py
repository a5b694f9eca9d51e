"""``python -m tools.search_plan``: choose what to drop by its measured effect on the model's output.

Greedy, as FinerCut does: starting from ``--plan`` (default ``full``), each step tries removing every
remaining candidate sublayer, scores the resulting model on a few calibration windows, and removes
the best one, until ``--drop KIND:N`` holds (N in total for that kind, the start plan's drops included).
``--shortlist K`` makes it cheaper: after the first step only the K best of the step before are scored.

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


def greedy(scorer: Scorer, start, kind: str, n: int, shortlist: int | None = None, progress: bool = True,
           log=None) -> tuple[dict, list[dict]]:
    """Remove sublayers one at a time until ``n`` of ``kind`` are dropped. Returns (plan dict, steps),
    steps = [{"remove": "attention 7", "score": float, "seconds": float, "scored": int}].

    shortlist K: the first step scores every candidate; each later step scores only the K candidates
    that scored best (lowest) at the step before (a lazy greedy: removing one sublayer seldom reorders
    the others' effects by much), so a search costs about C + (n-1) K candidates instead of ~n C."""
    from runtime.plan import load_plan

    if shortlist is not None and shortlist < 1:
        raise UserError(f"--shortlist: expected a positive integer, got {shortlist}")
    L = scorer.engine.config.num_layers
    p = load_plan(start, L)
    attention, mlp = set(p.drop_attention), set(p.drop_mlp)
    have = _dropped(attention, mlp, kind)
    if have >= n:
        raise UserError(f"--plan {p.name!r} already drops {have} {kind} sublayer(s); --drop {kind}:{n} asks for "
                        f"{n} in total, so there is nothing left to search")
    steps, previous = [], None  # previous: {move: score} of the last step
    per_step = [len(candidates(attention, mlp, kind, L)) - s for s in range(n - have)]
    if shortlist is not None:
        per_step = per_step[:1] + [min(shortlist, c) for c in per_step[1:]]
    bar = tqdm(total=sum(per_step), desc="search", unit="candidate", disable=not progress, file=sys.stderr)
    while _dropped(attention, mlp, kind) < n:
        t0 = time.perf_counter()
        moves = candidates(attention, mlp, kind, L)
        if not moves:
            raise UserError(f"--drop {kind}:{n}: no {kind} candidates left to drop")
        if shortlist is not None and previous is not None:
            moves = sorted(moves, key=lambda m: (previous.get(m, float("inf")), m))[:shortlist]
        scored = {}
        for move in moves:
            scored[move] = scorer(plan_dict(*apply(attention, mlp, move)))
            bar.update(1)
        move = min(scored, key=lambda m: (scored[m], m))
        score = scored.pop(move)
        previous = scored
        attention, mlp = apply(attention, mlp, move)
        step = {"remove": f"{move[0]} {move[1]}", "score": score, "seconds": round(time.perf_counter() - t0, 1),
                "scored": len(moves)}
        steps.append(step)
        bar.set_postfix(last=step["remove"], score=f"{score:.4g}")
        if log is not None:
            print(f"step {len(steps)}: remove {step['remove']}  {scorer.metric} {score:.6g}  "
                  f"({len(moves)} candidates, {step['seconds']} s)", file=log, flush=True)
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
    p.add_argument("--drop", required=True, help="KIND:N, KIND in " + ", ".join(KINDS))
    p.add_argument("--metric", default="kl", choices=METRICS)
    p.add_argument("--calib", default=str(WIKITEXT2), help="plain text or JSONL (default: WikiText-2 test, first half)")
    p.add_argument("--samples", type=int, default=4, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--shortlist", type=int, default=None, metavar="K",
                   help="after the first step, score only the K best candidates of the step before")
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
    checkpoint = resolve_model(args.model)
    kind, n = parse_budget(args.drop, load_config(checkpoint).num_layers)
    t0 = time.perf_counter()
    engine = runtime.load(checkpoint, dtype=args.dtype, device=args.device, compile=False)
    windows = calibration_windows(engine.tokenizer, args.calib, args.samples, args.seq_len)
    scorer = Scorer(engine, windows, args.metric, args.batch_size)
    drop_plan, steps = greedy(scorer, args.plan, kind, n, args.shortlist, log=sys.stderr)
    wall = time.perf_counter() - t0
    plan = {"version": 1, "name": out.stem,
            "description": f"greedy search: the {args.drop} whose removal changes the output least "
                           f"({args.metric} against the full model)",
            "drop": drop_plan["drop"],
            "source": {"tool": "tools.search_plan", "model": args.model or DEFAULT_MODEL, "calib": _portable(args.calib),
                       "samples": args.samples, "seq_len": args.seq_len, "metric": args.metric,
                       "shortlist": args.shortlist,
                       "start_plan": args.plan or "full", "drop": args.drop, "dtype": args.dtype,
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
