"""``python -m tools.heal_report``: plot held-out KL against training tokens for healing runs.

    python -m tools.heal_report ~/.cache/sublayer/healed/imp-attn10-all --png bench/results/quality/healing_kl.png

Reads each run's ``heal_log.json`` (a finished run) or its last ``.ckpt/step-N/state.json`` (a run in
progress) and writes one line per run (label: the directory name) and a CSV beside the PNG.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

from model.errors import UserError, cli_main


def history(run: Path) -> list[dict]:
    """[{"step", "tokens", "held_out_kl"}, ...] of a healing output directory."""
    if (run / "heal_log.json").is_file():
        return json.loads((run / "heal_log.json").read_text())["held_out_kl"]
    from tools.heal import last_checkpoint

    ckpt = last_checkpoint(run)
    if ckpt is None:
        raise UserError(f"{run}: neither heal_log.json nor a .ckpt/step-N checkpoint (not a tools.heal output)")
    return json.loads((ckpt / "state.json").read_text())["history"]


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.heal_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="tools.heal --out directories")
    p.add_argument("--png", required=True)
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = Path(args.png)
    rows = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in map(Path, args.runs):
        hist = history(run.expanduser())
        ax.plot([h["tokens"] / 1e3 for h in hist], [h["held_out_kl"] for h in hist], marker="o", label=run.name)
        rows += [{"run": run.name, "step": h["step"], "tokens": h["tokens"], "held_out_kl": round(h["held_out_kl"], 5)}
                 for h in hist]
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("held-out KL(full || healed), nats/token")
    ax.set_title("Healing SmolLM2-135M by distillation (WikiText-2, first half)", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    with open(png.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run", "step", "tokens", "held_out_kl"])
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {png} and {png.with_suffix('.csv')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
