"""``python -m tools.importance``: LLM-Drop importance scores and plans from calibration text.

For every attention sublayer, MLP sublayer and block, the cosine similarity between the residual
stream entering it and leaving it (output = input + sublayer(norm(input))), per token, averaged over
all tokens of N windows of T tokens; importance = 1 - similarity (He et al., "What Matters in
Transformers?"). Runs on the runtime itself, batched and deterministic.

    python -m tools.importance --calib ../shared/data/wikitext2/wiki.test.nonempty.raw --out scores.json
    python -m tools.importance ... --drop attention:10 --plan-out plans/imp-attn10.json [--iterative]

``--drop`` kinds: ``attention``, ``mlp``, ``block`` (the N least important of that kind), ``joint``
(attention and MLP ranked together) and ``span`` (the N consecutive blocks whose input and output are
most similar, as ShortGPT / Gromov et al. do).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.errors import UserError, cli_main
from runtime.schedule import AttentionStep
from runtime.plan import resolve_plan
from tools.calib import token_windows

DROP_KINDS = ("attention", "mlp", "block", "joint", "span")


@torch.inference_mode()
def similarities(engine, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """Mean per-token cosine similarity of each sublayer's and each block's input and output.

    windows: [N, T] token ids. Returns {"attention": [L], "mlp": [L], "block": [L], "block_span": [[L+1]]}
    (None where the engine's plan already drops the sublayer; a block's input is the residual entering
    layer i, its output the residual leaving it). ``block_span[i][j]`` is the similarity of the residual
    entering layer i and entering layer j (j > i): the span i..j-1 of blocks.
    """
    L = engine.config.num_layers
    sums = {"attention": [0.0] * L, "mlp": [0.0] * L}

    def observe(step, x_in, x_out):
        kind = "attention" if isinstance(step, AttentionStep) else "mlp"
        sums[kind][step.layer] += F.cosine_similarity(x_in.float(), x_out.float(), dim=-1).sum().item()
        if step.layer not in layer_in:
            layer_in[step.layer] = x_in.clone()  # the residual entering layer i
        layer_in[step.layer + 1] = x_out.clone()  # the last step of layer i leaves what enters layer i+1

    span = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    n_tokens = 0
    for i in tqdm(range(0, len(windows), batch_size), desc="scoring", unit="batch", disable=not progress):
        batch = windows[i:i + batch_size].to(engine.device)
        layer_in = {}
        engine.logits(batch, observer=observe, last_only=True)  # the LM head over every position is not needed
        n_tokens += batch.numel()
        # a layer with nothing kept passes the stream through unchanged
        states = []
        for layer in range(L + 1):
            if layer in layer_in:
                states.append(layer_in[layer])
            else:
                states.append(states[-1])
        flat = [s.float().reshape(-1, s.shape[-1]) for s in states]
        for a in range(L + 1):
            for b in range(a + 1, L + 1):
                span[a, b] += F.cosine_similarity(flat[a], flat[b], dim=-1).sum().item()
    kept_attn = set(engine.plan.kept_attention)
    kept_mlp = set(engine.plan.kept_mlp)
    span /= n_tokens
    return {
        "attention": [sums["attention"][i] / n_tokens if i in kept_attn else None for i in range(L)],
        "mlp": [sums["mlp"][i] / n_tokens if i in kept_mlp else None for i in range(L)],
        "block": [float(span[i, i + 1]) for i in range(L)],
        "block_span": [[float(span[a, b]) if b > a else None for b in range(L + 1)] for a in range(L + 1)],
    }


def importance(sim: dict) -> dict:
    """1 - similarity, per kind (None stays None)."""
    return {k: [None if s is None else 1.0 - s for s in sim[k]] for k in ("attention", "mlp", "block")}


def parse_drop(text: str, num_layers: int, kinds=DROP_KINDS) -> tuple[str, int]:
    """'KIND:N' -> (kind, N), KIND one of ``kinds``; N between 1 and the candidates of that kind."""
    kind, sep, n = str(text).partition(":")
    if kind not in kinds or not sep:
        raise UserError(f"--drop: unknown kind {kind!r}; expected one of {', '.join(kinds)} as KIND:N")
    try:
        n = int(n)
    except ValueError:
        raise UserError(f"--drop: expected KIND:N with an integer N, got {text!r}") from None
    limit = 2 * num_layers if kind == "joint" else num_layers
    if not 1 <= n <= limit:
        raise UserError(f"--drop: N must be between 1 and {limit} for {kind} on a {num_layers}-layer model, got {n}")
    return kind, n


def choose(scores: dict, kind: str, n: int, already: dict | None = None) -> dict:
    """The ``drop`` object of a plan: the n least important modules of ``kind`` (not yet dropped)."""
    already = already or {"attention": [], "mlp": [], "block": []}
    drop = {k: list(v) for k, v in already.items()}
    imp = importance(scores)
    L = len(imp["attention"])
    if kind == "span":
        span = scores["block_span"]
        best = max(range(L - n + 1), key=lambda a: (span[a][a + n], -a))
        drop["block"] = sorted(set(drop["block"]) | set(range(best, best + n)))
        return drop
    if kind == "joint":
        cands = [(imp[k][i], i, k) for k in ("attention", "mlp") for i in range(L) if imp[k][i] is not None]
    else:
        cands = [(imp[kind][i], i, kind) for i in range(L) if imp[kind][i] is not None]
    blocked = set(drop["block"])
    cands = [c for c in cands if c[1] not in blocked and c[1] not in drop.get(c[2], [])]
    if n > len(cands):
        raise UserError(f"--drop: asked for {n} {kind} modules but only {len(cands)} are left to drop")
    for _, i, k in sorted(cands, key=lambda c: (c[0], c[1]))[:n]:
        drop[k].append(i)
    # a layer with both sublayers gone is a block
    for i in sorted(set(drop["attention"]) & set(drop["mlp"])):
        drop["attention"].remove(i), drop["mlp"].remove(i), drop["block"].append(i)
    return {k: sorted(v) for k, v in drop.items()}


def run(model, calib, samples, seq_len, batch_size=4, drop=None, iterative=False, dtype="float32",
        device="auto", progress=True):
    """Score the model (and choose a plan when ``drop`` = "KIND:N"). Returns (scores, drop-object or None)."""
    import runtime

    engine = runtime.load(model, dtype=dtype, device=device, show_progress=progress)
    if drop is not None:
        kind, n = parse_drop(drop, engine.config.num_layers)
    windows = token_windows(engine.tokenizer, calib, seq_len, samples)
    scores = similarities(engine, windows, batch_size, progress)
    if drop is None:
        return engine, scores, None
    if not iterative or kind == "span":
        return engine, scores, choose(scores, kind, n)
    chosen = {"attention": [], "mlp": [], "block": []}
    current = scores
    for _ in range(n):  # drop one at a time, re-scoring the remaining modules under the plan so far
        chosen = choose(current, kind, 1, chosen)
        sub = runtime.load(model, plan={"version": 1, "drop": chosen}, dtype=dtype, device=device,
                           show_progress=False)
        current = similarities(sub, windows, batch_size, progress)
    return engine, scores, chosen


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.importance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory or known name (default: SmolLM2)")
    p.add_argument("--calib", required=True, help="plain text, or JSONL with a 'text' field")
    p.add_argument("--samples", type=int, default=16, help="windows of calibration text (N)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (T)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=None, help="write scores JSON here")
    p.add_argument("--drop", default=None, help="KIND:N with KIND in " + ", ".join(DROP_KINDS))
    p.add_argument("--plan-out", default=None, help="write the plan that --drop chooses here")
    p.add_argument("--iterative", action="store_true", help="re-score after each drop")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if (args.drop is None) != (args.plan_out is None):
        raise UserError("--drop and --plan-out go together")
    if args.out is None and args.drop is None:
        raise UserError("nothing to write: give --out and/or --drop with --plan-out")
    if args.batch_size < 1:
        raise UserError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    engine, scores, drop = run(args.model, args.calib, args.samples, args.seq_len, args.batch_size,
                               args.drop, args.iterative, args.dtype, args.device)
    from model.default_model import DEFAULT_MODEL

    source = {"tool": "tools.importance", "model": args.model or DEFAULT_MODEL, "calib": str(args.calib),
              "samples": args.samples, "seq_len": args.seq_len}
    if args.out:
        doc = dict(source, num_layers=engine.config.num_layers, similarity=scores,
                   importance=importance(scores))
        _write(args.out, json.dumps(doc, indent=1) + "\n")
        print(f"scores: {args.out}", file=sys.stderr)
    if drop is not None:
        name = Path(args.plan_out).stem
        plan = {"version": 1, "name": name,
                "description": f"the {args.drop} least important by input/output cosine similarity"
                               + (" (iterative)" if args.iterative else ""),
                "drop": drop, "source": dict(source, drop=args.drop, iterative=args.iterative)}
        resolve_plan(plan, engine.config.num_layers, where=args.plan_out)  # it must load
        _write(args.plan_out, json.dumps(plan, indent=2) + "\n")
        print(f"plan: {args.plan_out}: {json.dumps(drop)}", file=sys.stderr)
    imp = importance(scores)
    print("layer  attention      mlp    block   (importance = 1 - cosine similarity)")
    for i in range(engine.config.num_layers):
        cells = [f"{v:8.4f}" if v is not None else "       -" for v in (imp["attention"][i], imp["mlp"][i], imp["block"][i])]
        print(f"{i:5d}  {'  '.join(cells)}")
    return 0


def _write(path, text):
    """Write atomically: a temporary file renamed into place, so nothing is half-written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e})") from None


if __name__ == "__main__":
    sys.exit(main())
