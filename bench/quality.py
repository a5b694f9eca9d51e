"""Quality of layer-drop plans: lm-eval tasks and WikiText-2 perplexity, plan by plan.

    python -m bench.quality sweep [--plans full,attn66,...] [--plan-files plans/imp-attn10.json ...] \\
        [--tasks arc_easy_local,...] [--limit 100] [--mmlu-limit 2] [--ppl-windows 16] [--threads 1]
    python -m bench.quality report          # rebuild the table and plot from the CSV
    python -m bench.quality parity-report   # parity_vs_hf.md from bench/results/quality/parity_runs/

The sweep runs every plan x task cell in-process through the lm-eval adapter (``lm_eval.simple_evaluate``
with a ``SublayerLM``; the same as ``python -m tools.lm_eval --model sublayer ...``, whose command is
recorded per cell) and WikiText-2 token perplexity through ``tools.perplexity``. Each finished cell is
appended to ``<out>/<tag>.csv`` at once; a rerun skips the cells already there (same model, plan, task
and limit), so an interrupted sweep continues where it stopped. After each plan it rewrites
``<tag>.md`` (table) and ``<tag>.png`` (average score against the fraction of sublayers dropped).

Run it from the project root: the local task YAMLs read ``../shared/data/...`` relative to the
working directory.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shlex
import sys
import time
from pathlib import Path

from model.errors import cli_main

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "quality"
TASKS_DIR = "../shared/data/lm_eval_tasks"  # as the YAMLs expect: relative to the project root
PRESETS = ["full"] + [f"{k}{p}{s}" for k in ("attn", "mlp", "block") for p in ("90", "75", "66")
                      for s in ("", "-keeplast")]
DEFAULT_TASKS = ["arc_easy_local", "arc_challenge_local", "hellaswag_local", "truthfulqa_mc2_local", "mmlu_local"]
# the score each task contributes to the average (the usual choice in lm-eval leaderboards)
MAIN_METRIC = {"arc_easy_local": "acc_norm", "arc_challenge_local": "acc_norm", "hellaswag_local": "acc_norm",
               "hellaswag_local_sample500": "acc_norm", "truthfulqa_mc2_local": "acc",
               "truthfulqa_mc1_local": "acc", "mmlu_local": "acc"}
SHORT = {"arc_easy_local": "ARC-E", "arc_challenge_local": "ARC-C", "hellaswag_local": "HellaSwag",
         "truthfulqa_mc2_local": "TQA-MC2", "truthfulqa_mc1_local": "TQA-MC1", "mmlu_local": "MMLU",
         "hellaswag_local_sample500": "HS-500"}
PPL_TASK = "wikitext2_ppl"
FIELDS = ["model", "plan", "plan_arg", "kind", "keep_last", "num_layers", "dropped_attention", "dropped_mlp",
          "drop_fraction", "task", "metric", "value", "stderr", "n_docs", "limit", "wall_s", "command",
          "finished_at"]


# ---- the sweep ---------------------------------------------------------------------------------
def _plan_info(engine, plan_arg: str) -> dict:
    plan = engine.plan
    spec = plan.spec or {}
    rule = spec.get("rule") if isinstance(spec, dict) else None
    kind = rule["kind"] if rule else ("none" if not (plan.drop_attention or plan.drop_mlp) else "explicit")
    L = plan.num_layers
    return {"plan": plan.name, "plan_arg": plan_arg, "kind": kind,
            "keep_last": bool(rule and rule.get("keep_last")), "num_layers": L,
            "dropped_attention": " ".join(map(str, sorted(plan.drop_attention))),
            "dropped_mlp": " ".join(map(str, sorted(plan.drop_mlp))),
            "drop_fraction": f"{(len(plan.drop_attention) + len(plan.drop_mlp)) / (2 * L):.4f}"}


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _append_rows(path: Path, rows: list[dict]):
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def _limit_for(task: str, args) -> str:
    if task == PPL_TASK:
        return f"{args.ppl_windows}x{args.ppl_seq_len}"
    if task.startswith("mmlu"):
        return str(args.mmlu_limit)
    return str(args.limit)


def _lm_eval_command(args, plan_arg: str, task: str, limit: str) -> str:
    margs = f"pretrained={args.model},plan={plan_arg},dtype={args.dtype},device={args.device},batch_size={args.batch_size}"
    return (f"python -m tools.lm_eval --model sublayer --model_args {margs} --include_path {TASKS_DIR} "
            f"--tasks {task} --limit {limit}")


def _run_task(lm, task: str, limit: int, task_manager) -> tuple[dict, int]:
    import lm_eval

    out = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=task_manager,
                                  log_samples=False, bootstrap_iters=100)
    res = out["results"][task]
    metrics = {}
    for key, value in res.items():
        if "," not in key or "_stderr" in key:
            continue
        name = key.split(",")[0]
        err = res.get(key.replace(name, name + "_stderr", 1))
        metrics[name] = (value, err)
    n = out.get("n-samples", {})
    if task in n:
        docs = n[task]["effective"]
    else:  # a group: the sum over its subtasks
        docs = sum(v["effective"] for k, v in n.items() if k != task)
    return metrics, docs


def sweep(args) -> int:
    os.chdir(ROOT)  # the task YAMLs' data paths are relative to the project root
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import runtime
    import tools.lm_eval_adapter as adapter
    from lm_eval.tasks import TaskManager
    from tools.calib import WIKITEXT2, token_windows
    from tools.perplexity import perplexity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{args.tag}.csv"
    plans = [p for p in args.plans.split(",") if p] + list(args.plan_files or [])
    tasks = [t for t in args.tasks.split(",") if t] + ([PPL_TASK] if args.ppl_windows else [])
    model_name = str(args.model)
    done = {(r["model"], r["plan_arg"], r["task"], r["limit"]) for r in _read_csv(csv_path)}
    log = open(out / f"{args.tag}.log", "a")
    print(f"# {dt.datetime.now().isoformat(timespec='seconds')} $ python -m bench.quality {' '.join(map(shlex.quote, sys.argv[1:]))}", file=log,
          flush=True)
    tm = None
    for plan_arg in plans:
        todo = [t for t in tasks if (model_name, plan_arg, t, _limit_for(t, args)) not in done]
        if not todo:
            print(f"{plan_arg}: all cells done, skipping", flush=True)
            continue
        engine = runtime.load(args.model, plan=plan_arg, dtype=args.dtype, device=args.device)
        info = _plan_info(engine, plan_arg)
        print(f"== {engine.plan.describe()}", flush=True)
        lm = adapter.SublayerLM(engine=engine, batch_size=args.batch_size)
        for task in todo:
            limit = _limit_for(task, args)
            t0 = time.perf_counter()
            if task == PPL_TASK:
                windows = token_windows(engine.tokenizer, WIKITEXT2, args.ppl_seq_len, args.ppl_windows)
                metrics, docs = {"token_perplexity": (perplexity(engine, windows, progress=False), None)}, len(windows)
                command = (f"python -m tools.perplexity --model {args.model} --plan {plan_arg} --seq-len "
                           f"{args.ppl_seq_len} --windows {args.ppl_windows} --dtype {args.dtype}")
            else:
                if tm is None:
                    tm = TaskManager(include_path=TASKS_DIR)
                metrics, docs = _run_task(lm, task, int(limit), tm)
                command = _lm_eval_command(args, plan_arg, task, limit)
            wall = time.perf_counter() - t0
            now = dt.datetime.now().isoformat(timespec="seconds")
            rows = [dict(info, model=model_name, task=task, metric=m, value=f"{v:.6g}",
                         stderr="" if e in (None, "N/A") else f"{e:.4g}", n_docs=docs, limit=limit,
                         wall_s=f"{wall:.1f}", command=command, finished_at=now) for m, (v, e) in metrics.items()]
            _append_rows(csv_path, rows)
            shown = ", ".join(f"{m}={v:.4g}" for m, (v, _) in metrics.items())
            line = f"{plan_arg:>18} {task:<22} limit={limit:<7} {shown}  ({docs} docs, {wall:.0f} s)"
            print(line, flush=True)
            print(line, file=log, flush=True)
        del lm, engine
        report(args)
    report(args)
    return 0


# ---- the report ----------------------------------------------------------------------------------
def _cells(rows):
    cells, info = {}, {}
    for r in rows:
        cells.setdefault(r["plan_arg"], {}).setdefault(r["task"], {})[r["metric"]] = r
        info[r["plan_arg"]] = r
    return cells, info


def _order(plan_args):
    def key(p):
        return (PRESETS.index(p) if p in PRESETS else len(PRESETS), p)
    return sorted(plan_args, key=key)


def _average(task_cells, tasks):
    vals = [float(task_cells[t][MAIN_METRIC[t]]["value"]) for t in tasks
            if t in task_cells and MAIN_METRIC.get(t) in task_cells[t]]
    return (sum(vals) / len(vals), len(vals)) if vals else (None, 0)


def report(args) -> int:
    out = Path(args.out)
    rows = [r for r in _read_csv(out / f"{args.tag}.csv") if r["model"] == str(args.model)]
    if not rows:
        print(f"no rows for model {args.model} in {out / (args.tag + '.csv')}", file=sys.stderr)
        return 1
    cells, info = _cells(rows)
    tasks = [t for t in MAIN_METRIC if any(t in c for c in cells.values())]
    has_ppl = any(PPL_TASK in c for c in cells.values())
    lines = [f"# Quality of layer-drop plans: {Path(str(args.model)).name}", "",
             f"Written by `python -m bench.quality` on {dt.date.today().isoformat()} from `{args.tag}.csv` "
             "(one row per plan x task x metric, with the exact command, limit and wall time of each cell).", "",
             "Scores in %: " + ", ".join(f"{SHORT.get(t, t)} = `{t}` {MAIN_METRIC[t]}" for t in tasks)
             + ". *avg* is their mean (`*`: not all tasks done yet).", ""]
    limits = sorted({(r["task"], r["limit"]) for r in rows})
    lines.append("Limits (documents per task; MMLU: per subject; perplexity: windows x tokens): "
                 + ", ".join(f"{SHORT.get(t, t)} {lim}" for t, lim in limits) + ".")
    lines.append("")
    head = ["plan", "attn dropped", "MLP dropped", "frac"] + [SHORT.get(t, t) for t in tasks] + ["avg"]
    if has_ppl:
        head.append("WikiText-2 ppl")
    head.append("wall s")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in _order(cells):
        c, r = cells[p], info[p]
        avg, n = _average(c, tasks)
        na, nm = len(r["dropped_attention"].split()), len(r["dropped_mlp"].split())
        L = int(r["num_layers"])
        vals = [f"{100 * float(c[t][MAIN_METRIC[t]]['value']):.1f}" if t in c else "" for t in tasks]
        row = [p if p == r["plan"] else f"{r['plan']} (`{p}`)", f"{na}/{L}", f"{nm}/{L}",
               f"{float(r['drop_fraction']):.3f}"] + vals
        row.append("" if avg is None else f"{100 * avg:.1f}" + ("" if n == len(tasks) else "*"))
        if has_ppl:
            v = float(c[PPL_TASK]["token_perplexity"]["value"]) if PPL_TASK in c else None
            row.append("" if v is None else f"{v:.2f}" if v < 1e4 else f"{v:.3g}")
        wall = sum(float(next(iter(m.values()))["wall_s"]) for m in c.values())
        row.append(f"{wall:.0f}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("*frac*: dropped sublayers / (2 x layers). Perplexity: token perplexity of WikiText-2 test "
                 "(`tools.perplexity`, disjoint windows from the start of the file). *wall s*: the plan's cells "
                 "together (CPU, shared with other work: indicative only).")
    lines += ["", "Reading it: with these limits one question is 1 point of ARC/HellaSwag/TruthfulQA and 1.75 "
              "points of MMLU (57 questions at 1 per subject), so differences of a few points are noise. "
              "TruthfulQA MC2 is the normalised probability mass on the true answers (a model that could not tell "
              "answers apart at all would score the share of true answers, 44% on the first 100 questions); "
              "here it *rises* as plans break the model, so read it together with the other columns."]
    cmds = sorted({r["command"] for r in rows if r["plan_arg"] == "full"})
    if cmds:
        lines += ["", "Commands of the `full` cells (other plans: the same with `plan=`):", ""]
        lines += [f"    {c}" for c in cmds]
    logp = out / f"{args.tag}.log"
    if logp.is_file():
        sweeps = [ln[2:].strip() for ln in logp.read_text().splitlines() if ln.startswith("# ")]
        if sweeps:
            lines += ["", "Sweep invocations (from the log):", ""] + [f"    {s}" for s in sweeps]
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    _plot(out / f"{args.tag}.png", cells, info, tasks, has_ppl, args)
    print(f"wrote {out / (args.tag + '.md')} and {out / (args.tag + '.png')}")
    return 0


def _plot(path, cells, info, tasks, has_ppl, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if has_ppl else 1, figsize=(12 if has_ppl else 7, 4.5), squeeze=False)
    colors = {"attention": "tab:blue", "mlp": "tab:red", "block": "tab:green", "explicit": "tab:purple"}

    def series(metric_of):
        pts = {}
        for p, c in cells.items():
            r = info[p]
            y = metric_of(c)
            if y is None:
                continue
            x = float(r["drop_fraction"])
            if r["kind"] == "none":
                for kind in ("attention", "mlp", "block"):
                    for kl in (False, True):
                        pts.setdefault((kind, kl), []).append((x, y, p))
            else:
                pts.setdefault((r["kind"], r["keep_last"] == "True"), []).append((x, y, p))
        return {k: v for k, v in pts.items() if any(info[p]["kind"] != "none" for _, _, p in v)}

    def avg_of(c):
        a, n = _average(c, tasks)
        return None if a is None or n < len(tasks) else 100 * a

    panels = [(axes[0][0], avg_of, "average score (%)")]
    if has_ppl:
        panels.append((axes[0][1], lambda c: float(c[PPL_TASK]["token_perplexity"]["value"]) if PPL_TASK in c else None,
                       "WikiText-2 token perplexity"))
    for ax, fn, label in panels:
        for (kind, kl), pts in sorted(series(fn).items()):
            pts.sort()
            xs, ys = [x for x, _, _ in pts], [y for _, y, _ in pts]
            if kind == "explicit":
                ax.scatter(xs, ys, color=colors[kind], marker="*", s=80, zorder=3, label="explicit plans")
                for x, y, p in pts:
                    ax.annotate(info[p]["plan"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
                continue
            ax.plot(xs, ys, marker="o", color=colors[kind], linestyle="--" if kl else "-",
                    label=f"{kind}{' (keep last)' if kl else ''}")
        ax.set_xlabel("fraction of sublayers dropped")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if label.startswith("WikiText"):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{Path(str(args.model)).name}: layer-drop plans (tasks: {', '.join(SHORT.get(t, t) for t in tasks)})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- parity with lm-eval's HF model ------------------------------------------------------------
def _load_run(d: Path):
    results = sorted(d.rglob("results_*.json"))
    if not results:
        return None, {}
    res = json.loads(results[-1].read_text())
    samples = {}
    for f in d.rglob("samples_*.jsonl"):
        task = f.name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = {s["doc_id"]: s for s in map(json.loads, f.read_text().splitlines())}
    return res, samples


def parity_report(args) -> int:
    runs = Path(args.runs)
    lines = ["# Parity: sublayer adapter vs lm-eval `--model hf`", "",
             "Same checkpoint directory (`~/.cache/sublayer/smollm2-135m-instruct`, SmolLM2-135M-Instruct, "
             "float32 safetensors), float32, CPU, lm-eval 0.4.13, local task YAMLs. Written by "
             "`python -m bench.quality parity-report` from the runs in `parity_runs/` "
             "(scripts `parity_runs/run_parity.sh` and `parity_runs/rerun_sublayer.sh`, which re-ran the two sublayer "
             "runs with the final adapter code; logs and lm-eval's results beside them; the per-request comparison "
             "below needs lm-eval's per-sample outputs, `--log_samples`, which are not kept in the repository).", ""]
    ok = True
    for kind in ("mc", "wt"):
        ours, ours_s = _load_run(runs / f"sublayer_{kind}")
        hf, hf_s = _load_run(runs / f"hf_{kind}")
        if ours is None or hf is None:
            lines += [f"*{kind}: run missing or unfinished*", ""]
            ok = False
            continue
        for task in sorted(ours["results"]):
            ro, rh = ours["results"][task], hf["results"][task]
            so, sh = ours_s.get(task, {}), hf_s.get(task, {})
            lim = ours["config"].get("limit")
            lim = int(lim) if isinstance(lim, float) and lim.is_integer() else lim
            lines += [f"## {task} (`--limit {lim}`, {len(so)} documents)", "",
                      "| metric | sublayer | hf | difference |", "|---|---|---|---|"]
            for key in sorted(ro):
                if "," not in key or "stderr" in key or not isinstance(ro[key], (int, float)):
                    continue
                a, b = float(ro[key]), float(rh[key])
                rel = f" ({100 * (a - b) / b:+.4f}%)" if "perplexity" in key or "bits" in key else ""
                lines.append(f"| {key.split(',')[0]} | {a:.6g} | {b:.6g} | {a - b:+.3g}{rel} |")
            lines.append("")
            dmax, rmax, nreq, greedy_diff, doc_diff = 0.0, 0.0, 0, 0, {}
            for doc_id, s in so.items():
                t = sh[doc_id]
                for x, y in zip(s["resps"], t["resps"]):
                    x, y = x[0], y[0]
                    if isinstance(x, list):
                        dmax = max(dmax, abs(float(x[0]) - float(y[0])))
                        greedy_diff += str(x[1]) != str(y[1])
                    else:
                        dmax = max(dmax, abs(float(x) - float(y)))
                        rmax = max(rmax, abs(float(x) - float(y)) / abs(float(y)))
                    nreq += 1
                for m in ("acc", "acc_norm"):
                    if m in s and s[m] != t[m]:
                        doc_diff.setdefault(m, []).append(doc_id)
            if not so:
                continue
            rel = f" (relative {rmax:.2g}; each request is a whole page)" if rmax else ""
            lines.append(f"Per request ({nreq} requests): max |log-likelihood difference| = {dmax:.3g}{rel}; "
                         f"is_greedy differs in {greedy_diff}. Documents scored differently: "
                         + (", ".join(f"{m}: {v}" for m, v in doc_diff.items()) or "none") + ".")
            lines.append("")
    cmd_log = runs / "commands.log"
    if cmd_log.is_file():
        lines += ["## Commands and wall times", "", "Both sides single-threaded (`OMP_NUM_THREADS=1`) on 2 CPU "
                  "cores shared with other work (the HF runs beside the first sublayer runs, the sublayer re-runs "
                  "beside the quality sweep), so wall times are indicative only.", "", "```"]
        lines += cmd_log.read_text().splitlines() + ["```"]
    Path(args.out, "parity_vs_hf.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {Path(args.out, 'parity_vs_hf.md')}")
    return 0 if ok else 1


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("sweep", "report"):
        s = sub.add_parser(name)
        s.add_argument("--model", default="smollm2-135m-instruct")
        s.add_argument("--out", default=str(OUT))
        s.add_argument("--tag", default="smollm2", help="file name stem of the CSV / table / plot")
        if name == "sweep":
            s.add_argument("--plans", default=",".join(PRESETS), help="comma-separated preset names (or plan paths)")
            s.add_argument("--plan-files", nargs="*", default=[], help="more plans, as JSON files")
            s.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
            s.add_argument("--limit", type=int, default=100, help="documents per task")
            s.add_argument("--mmlu-limit", type=int, default=2, help="documents per MMLU subject (57 subjects)")
            s.add_argument("--ppl-windows", type=int, default=16, help="WikiText-2 windows (0: no perplexity)")
            s.add_argument("--ppl-seq-len", type=int, default=512)
            s.add_argument("--batch-size", type=int, default=16)
            s.add_argument("--dtype", default="float32")
            s.add_argument("--device", default="cpu")
            s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s = sub.add_parser("parity-report")
    s.add_argument("--runs", default=str(OUT / "parity_runs"))
    s.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.cmd == "sweep":
        return sweep(args)
    if args.cmd == "report":
        return report(args)
    return parity_report(args)


if __name__ == "__main__":
    sys.exit(main())
