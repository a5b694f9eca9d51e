"""``python -m tools.similarity``: layer-similarity report (Tyukin et al.'s Figure 1, LLM-Drop's scores).

Per layer: cosine similarity of the layer's output with the previous layer's output (its input), and
of each sublayer's input and output; plus the similarity of the residual stream between any two
depths. Writes ``similarity.csv``, ``similarity.png`` (matplotlib) and ``scores.json`` into --out.

    python -m tools.similarity --calib ../shared/data/wikitext2/wiki.test.nonempty.raw --out bench/results/similarity
"""

import argparse
import csv
import json
import sys
from pathlib import Path

from model.errors import UserError, cli_main
from tools.importance import importance, similarities
from tools.calib import token_windows


def plot(scores: dict, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(scores["block"])
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.4, 1]})
    layers = list(range(L))
    ax.plot(layers, scores["block"], "k-o", ms=3, label="layer output vs previous layer's output")
    ax.plot(layers, scores["attention"], "-o", ms=3, label="attention sublayer: input vs output")
    ax.plot(layers, scores["mlp"], "-o", ms=3, label="MLP sublayer: input vs output")
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine similarity (mean over tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    span = [[(v if v is not None else float("nan")) for v in row] for row in scores["block_span"]]
    im = hm.imshow(span, origin="lower", cmap="viridis")
    hm.set_xlabel("depth j (residual entering layer j)")
    hm.set_ylabel("depth i")
    hm.set_title("similarity of the residual stream at depths i < j")
    fig.colorbar(im, ax=hm, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.similarity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--calib", required=True, help="plain text, or JSONL with a 'text' field")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    import runtime

    engine = runtime.load(args.model, dtype=args.dtype, device=args.device)
    windows = token_windows(engine.tokenizer, args.calib, args.seq_len, args.samples)
    scores = similarities(engine, windows, args.batch_size)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot create {out} ({e})") from None
    imp = importance(scores)
    with open(out / "similarity.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "block_similarity", "attention_similarity", "mlp_similarity",
                    "block_importance", "attention_importance", "mlp_importance"])
        for i in range(engine.config.num_layers):
            w.writerow([i, scores["block"][i], scores["attention"][i], scores["mlp"][i],
                        imp["block"][i], imp["attention"][i], imp["mlp"][i]])
    from model.default_model import DEFAULT_MODEL

    source = {"model": args.model or DEFAULT_MODEL, "calib": str(args.calib), "samples": args.samples,
              "seq_len": args.seq_len}
    (out / "scores.json").write_text(json.dumps(dict(source, similarity=scores, importance=imp), indent=1) + "\n")
    name = Path(source["model"]).name
    plot(scores, out / "similarity.png", f"{name}: {args.samples} x {args.seq_len} tokens of {Path(args.calib).name}")
    print(f"wrote {out / 'similarity.csv'}, {out / 'similarity.png'}, {out / 'scores.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
