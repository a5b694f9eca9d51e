"""``python -m bench.quant_quality``: what load-time quantization costs in quality and saves in memory.

For each scheme (``none``, ``int8``, ``int4-g64``, ... as ``bench.latency --quants`` labels them):

- against the float model on the same tokens (``--tokens`` of WikiText-2 from ``--start-fraction``): the
  relative error of the logits ||q - f|| / ||f|| over every position and the top-1 agreement;
- with ``--ppl-windows N``: held-out perplexity (``tools.perplexity``) per plan in ``--plans``;
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
    p.add_argument("--plans", default="full", help="plans for --ppl-windows")
    p.add_argument("--ppl-windows", type=int, default=0, help="held-out perplexity over N windows of 512 (0: skip)")
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
    base = load(args.model, None, args.dtype, "none", False)
    ids = token_windows(base.tokenizer, WIKITEXT2, args.tokens, 1, args.start_fraction)
    ref = base.logits(ids)[0].double()
    top1 = ref.argmax(-1)
    rows = []
    for label in labels:
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
                    engine = load(args.model, plan, args.dtype, label, args.quant_head)
                except UserError:
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
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python -m bench.quant_quality " + " ".join(sys.argv[1:] if argv is None else argv),
                       "dtype": args.dtype, "errors": rows, "perplexity": ppl, "rss": rss}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
