"""``python -m bench.quant_quality``: what load-time quantization costs in quality and saves in memory.

For each scheme (``none``, ``int8``, ``int4-g64``, ... as ``bench.latency --quants`` labels them):

- against the float model on the same tokens (``--tokens`` of WikiText-2 from ``--start-fraction``): the
  relative error of the logits ||q - f|| / ||f|| over every position and the top-1 agreement;
- with ``--ppl-windows N``: held-out perplexity (``tools.perplexity``) per plan in ``--plans``;
- with ``--speed CONTEXTS``: decode ms/token at batch 1 for every scheme and ``--dtypes``, all engines
  in one process with their decode steps alternating (a loaded machine slows them alike), and with
  ``--projections`` each projection's one-row multiply-reduce alone (the compiled CPU loop);
- with ``--rss``: resident memory in a fresh process after loading and one forward pass (CONVENTIONS.md),
  against the weight bytes the engine counts, and against a process that imported everything but
  loaded no model.

A scheme the model cannot take (a group size that does not divide a dimension) is a row saying so.
Prints a markdown table; ``--out FILE.json`` keeps the numbers.
"""

import argparse
import json
import subprocess
import sys

from model.errors import UserError, cli_main

MiB = 2**20


def load(model, plan, dtype, label, quant_head):
    import runtime
    from model.quant import parse_label

    quant, group_size = parse_label(label, "--schemes")
    return runtime.load(model, plan=plan, dtype=dtype, device="cpu", compile=False, show_progress=False, quant=quant,
                        group_size=group_size, quant_head=quant_head and quant is not None)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def speed(model, labels, dtypes, contexts, quant_head, steps=32, warmup=4) -> list[dict]:
    """Decode ms/token (median of ``steps``), engines of every scheme x dtype alternating step by step."""
    import time

    import torch

    rows = []
    for T in contexts:
        runs = []
        for dtype in dtypes:
            for label in labels:
                try:
                    engine = load(model, None, dtype, label, quant_head)
                except UserError as e:  # reported by the error rows
                    print(f"{label}: skipped: {e}", file=sys.stderr)
                    continue
                engine.decode_mode = "compiled"
                cache = engine.new_cache(1, T + warmup + steps + 1)
                kv0 = torch.zeros(1, dtype=torch.int32)
                ids = torch.randint(3, engine.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
                logits = engine.forward(ids, cache, 0, kv0, torch.arange(T)[None], last_only=True)
                runs.append({"engine": engine, "cache": cache, "logits": logits, "times": [], "label": label,
                             "dtype": dtype})
        for i in range(warmup + steps):
            for r in runs:
                tok = r["logits"][:, -1].argmax(-1, keepdim=True)
                t0 = time.perf_counter()
                r["logits"] = r["engine"].decode_step(tok, r["cache"], torch.tensor([T + i]), kv0)
                r["times"].append(time.perf_counter() - t0)
        for r in runs:
            e, ms = r["engine"], median(r["times"][warmup:]) * 1e3
            rows.append({"scheme": r["label"], "dtype": r["dtype"], "context": T, "decode_ms": ms,
                         "step_MiB": e.step_bytes(T) / MiB, "GBps": e.step_bytes(T) / ms / 1e6})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def projections(model, labels, dtypes, n=200) -> list[dict]:
    """Per projection of layer 0 (fused q/k/v, o, fused gate/up, down) and x 30: the compiled one-row
    multiply-reduce alone, ms per call (median), every scheme's call alternating."""
    import time

    import torch

    from runtime.step import multiply_reduce

    torch._dynamo.config.recompile_limit = 64  # a variant per projection shape, scheme and dtype
    run = torch.compile(multiply_reduce, fullgraph=True)
    rows = []
    for dtype in dtypes:
        engines = {}
        for label in labels:
            try:
                engines[label] = load(model, None, dtype, label, False)
            except UserError as e:
                print(f"{label}: skipped: {e}", file=sys.stderr)
        for proj in ("qkv", "o", "gate_up", "down"):
            source = "layers"
            ws = {}
            for label, e in engines.items():
                layer = e.layers[0] if proj in ("qkv", "o") else e.layers[1]
                ws[label] = getattr(layer, proj)
            K = next(iter(ws.values())).shape[1]
            x = torch.randn(1, 1, K).to(e.dtype)
            times = {label: [] for label in ws}
            for label in ws:
                for _ in range(3):
                    run(x, ws[label])
            for _ in range(n):
                for label in ws:
                    t0 = time.perf_counter()
                    run(x, ws[label])
                    times[label].append(time.perf_counter() - t0)
            for label in ws:
                rows.append({"dtype": dtype, "projection": proj, "scheme": label, "ms": median(times[label]) * 1e3,
                             "shape": list(ws[label].shape), "from": source})
                print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def rss_worker(model, label, quant_head, dtype) -> dict:
    """In a fresh process: VmRSS after load + one forward (or after the imports only, label '-')."""
    import torch

    import runtime  # noqa: F401
    from runtime import engine as _  # noqa: F401  (the imports a load brings in)

    out = {}
    if label != "-":
        engine = load(model, None, dtype, label, quant_head)
        engine.logits(torch.arange(3, 19)[None])
        out = {"weight_MiB": engine.weight_bytes / MiB}
    status = open("/proc/self/status").read().splitlines()
    rss = next(ln for ln in status if ln.startswith("VmRSS:"))
    return {**out, "rss_MiB": int(rss.split()[1]) / 1024}


def measure_rss(model, label, quant_head, dtype) -> dict:
    cmd = [sys.executable, "-m", "bench.quant_quality", "--rss-worker", json.dumps([model, label, quant_head, dtype])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quant_quality", description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--schemes", default="int8,int4-g32,int4-g64,int4-g128")
    p.add_argument("--quant-head", action="store_true", help="quantize the embedding and LM head too")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--start-fraction", type=float, default=0.5)
    p.add_argument("--plans", default="full", help="plans for --ppl-windows (checkpoint: the checkpoint's own, e.g. a "
                   "healed model's)")
    p.add_argument("--ppl-windows", type=int, default=0, help="held-out perplexity over N windows of 512 (0: skip)")
    p.add_argument("--speed", default=None, help="comma-separated contexts: decode ms/token per scheme and dtype")
    p.add_argument("--projections", action="store_true", help="compiled one-row multiply-reduce per projection")
    p.add_argument("--dtypes", default="float32,bfloat16", help="for --speed and --projections")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-errors", action="store_true", help="skip the logits error rows")
    p.add_argument("--rss", action="store_true", help="resident memory per scheme, each in a fresh process")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    p.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_worker:
        print(json.dumps(rss_worker(*json.loads(args.rss_worker))))
        return 0
    import torch

    from model.quant import parse_label
    from tools.calib import WIKITEXT2, token_windows
    from tools.perplexity import perplexity

    labels = [s for s in args.schemes.split(",") if s]
    for label in labels:
        parse_label(label, "--schemes")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [d for d in args.dtypes.split(",") if d]
    timed = []
    if args.projections:
        timed += projections(args.model, labels, dtypes)
    if args.speed:
        from bench.flags import int_list

        timed += speed(args.model, labels, dtypes, int_list(args.speed, "--speed"), args.quant_head)
    base = load(args.model, None, args.dtype, "none", False)
    ids = token_windows(base.tokenizer, WIKITEXT2, args.tokens, 1, args.start_fraction)
    ref = base.logits(ids)[0].double()
    top1 = ref.argmax(-1)
    rows = []
    for label in ([] if args.skip_errors else labels):
        row = {"scheme": label + ("+head" if args.quant_head else ""), "tokens": args.tokens}
        try:
            engine = load(args.model, None, args.dtype, label, args.quant_head)
        except UserError as e:
            row["refused"] = str(e)
            rows.append(row)
            print(f"{label}: refused: {e}", file=sys.stderr)
            continue
        q = engine.logits(ids)[0].double()
        row |= {"weight_MiB": engine.weight_bytes / MiB, "float_weight_MiB": base.weight_bytes / MiB,
                "rel_err": ((q - ref).norm() / ref.norm()).item(),
                "top1_agree": (q.argmax(-1) == top1).double().mean().item()}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        del engine
    ppl = []
    if args.ppl_windows:
        windows = None
        for plan in [s for s in args.plans.split(",") if s]:
            for label in ["none"] + labels:
                try:
                    engine = load(args.model, None if plan == "checkpoint" else plan, args.dtype, label,
                                  args.quant_head)
                except UserError as e:
                    print(f"ppl {plan} {label}: refused: {e}", file=sys.stderr)
                    continue
                if windows is None:
                    windows = token_windows(engine.tokenizer, WIKITEXT2, 512, args.ppl_windows, 0.5)
                value = perplexity(engine, windows, progress=False)
                ppl.append({"plan": plan, "scheme": label, "ppl": value, "windows": args.ppl_windows})
                print(json.dumps(ppl[-1]), file=sys.stderr)
                del engine
    rss = []
    if args.rss:
        imports = measure_rss(args.model, "-", False, args.dtype)
        for label in ["none"] + labels:
            rss.append({"scheme": label, **measure_rss(args.model, label, args.quant_head, args.dtype),
                        "imports_only_rss_MiB": imports.get("rss_MiB")})
            print(json.dumps(rss[-1]), file=sys.stderr)
    print("| scheme | weights MiB (float) | logits rel. error | top-1 agreement |")
    print("|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['scheme']} | refused: {r['refused']} | | |")
        else:
            print(f"| {r['scheme']} | {r['weight_MiB']:.1f} ({r['float_weight_MiB']:.1f}) | {r['rel_err']:.4f} | "
                  f"{r['top1_agree']:.3f} |")
    if ppl:
        print("\n| plan | scheme | held-out perplexity |\n|---|---|---|")
        for r in ppl:
            print(f"| {r['plan']} | {r['scheme']} | {r['ppl']:.3f} |")
    if rss:
        print("\n| scheme | weights MiB | RSS after load + forward MiB | RSS - imports-only MiB |\n|---|---|---|---|")
        for r in rss:
            if "error" in r:
                print(f"| {r['scheme']} | failed: {r['error']} | | |")
            else:
                print(f"| {r['scheme']} | {r['weight_MiB']:.1f} | {r['rss_MiB']:.1f} | "
                      f"{r['rss_MiB'] - r['imports_only_rss_MiB']:.1f} |")
    for r in timed:
        print("| " + " | ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in r.items()) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python -m bench.quant_quality " + " ".join(sys.argv[1:] if argv is None else argv),
                       "dtype": args.dtype, "threads": torch.get_num_threads(), "errors": rows, "perplexity": ppl,
                       "rss": rss, "speed": timed}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
