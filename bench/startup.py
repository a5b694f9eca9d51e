"""Start-up and steadiness: ``python -m bench.startup``.

1. Whole-process wall time of one CLI run, ``python -m runtime.generate`` (greedy, the default model),
   against a plain transformers script doing the same (``AutoModelForCausalLM``, sdpa, ``generate``)
   and llama.cpp's Python binding on the f32 GGUF (when ``llama_cpp`` is importable and the GGUF is in
   ``$SUBLAYER_CACHE/gguf/``): 16 and 64 new tokens, bfloat16 and float32, ours with a warm compile
   cache and a cold one (an empty compile cache and an empty inductor cache), each configuration
   ``--repeats`` times round-robin; the median and the spread (min-max). The transformers script runs
   as a user runs it (libgomp's default spinning wait) and with ``OMP_WAIT_POLICY=PASSIVE`` as ours.
2. Decode step times with one competing busy process: a bounded CPU burner (a Python loop that exits
   by itself) started and stopped by the bench, ``--steps`` decode steps timed alone in a fresh
   process per setting: 1 and 2 threads, OpenMP waits that spin (libgomp's default,
   ``GOMP_SPINCOUNT=300000``), that sleep at once (``OMP_WAIT_POLICY=PASSIVE``) and that spin a
   bounded number of rounds first (``--spin-counts``, runtime's default among them), and the idle
   machine; median, p99 and max.

Writes ``startup.json``, ``startup.md`` and ``startup.png`` under ``--out``; the load average is
recorded next to every block (other work on the machine changes everything here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from model.errors import UserError, cli_main

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The history of the city begins in the year"

HF_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, n, dtype = sys.argv[1], int(sys.argv[2]), getattr(torch, sys.argv[3])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
ids = tok(sys.argv[4], return_tensors="pt")
out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
print(tok.decode(out[0]))
"""

LLAMA_CPP_SCRIPT = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[3]), n_ctx=256, verbose=False)
print(llm.create_completion(sys.argv[4], max_tokens=int(sys.argv[2]), temperature=0.0)["choices"][0]["text"])
"""

# One process of the contention part: load, prefill, then ``steps`` decode steps timed alone.
STEPS_SCRIPT = """
import json, sys, time
import runtime, torch
threads, steps, dtype, budget = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[5])
e = runtime.load(None, dtype=dtype, device="cpu", threads=threads)
ids = e.tokenizer.encode(sys.argv[4])
cache = e.own_cache(1, len(ids) + steps + 8)
kv0 = torch.zeros(1, dtype=torch.int32)
with torch.inference_mode():
    logits = e.forward(torch.tensor([ids]), cache, 0, kv0, torch.arange(len(ids))[None], last_only=True)
    tok = logits[:, -1].argmax(-1, keepdim=True)
    times = []
    end = time.perf_counter() + budget
    for i in range(steps + 4):
        t = time.perf_counter()
        tok = e.decode_step(tok, cache, torch.tensor([len(ids) + i]), kv0)[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
        if t > end:  # a pathological setting: stop early, say how many steps were timed
            break
print(json.dumps(times[4:]))
"""

BURNER = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"

POLICIES = {"spin": {"GOMP_SPINCOUNT": "300000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def policy_env(policy: str) -> dict:
    """The environment of an OpenMP wait policy: a name of ``POLICIES`` or ``spin N`` (N rounds)."""
    if policy.startswith("spin "):
        return {"GOMP_SPINCOUNT": policy.split()[1]}
    return POLICIES[policy]


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    return {**env, **extra}


def timed(cmd, env) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return wall, r.stderr


def cold_cache_env(tmp: Path, model_dir: Path) -> dict:
    """An empty sublayer compile cache (the model linked in, not re-imported) and inductor cache."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "sublayer").mkdir(exist_ok=True)
    link = tmp / "sublayer" / model_dir.name
    if not link.exists():
        link.symlink_to(model_dir)
    return {"SUBLAYER_CACHE": str(tmp / "sublayer"), "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor")}


def wall_times(args, model_dir: Path, gguf: Path | None) -> list[dict]:
    """Round-robin whole-process runs; returns one row per configuration."""
    configs = []
    for dtype in args.dtypes.split(","):
        for n in (16, 64):
            base = [sys.executable, "-m", "runtime.generate", "--prompt", PROMPT, "--max-new-tokens", str(n),
                    "--dtype", dtype]
            configs.append({"impl": "sublayer CLI, warm cache", "dtype": dtype, "tokens": n, "cmd": base, "cold": False})
            configs.append({"impl": "sublayer CLI, cold cache", "dtype": dtype, "tokens": n, "cmd": base, "cold": True})
            hf = [sys.executable, "-c", HF_SCRIPT, str(model_dir), str(n), dtype, PROMPT]
            if "peers" in args.skip:
                continue
            configs.append({"impl": "transformers script (HF eager, sdpa)", "dtype": dtype, "tokens": n, "cmd": hf,
                            "cold": False})
            configs.append({"impl": "transformers script, OMP_WAIT_POLICY=PASSIVE", "dtype": dtype, "tokens": n,
                            "cmd": hf, "cold": False, "env": POLICIES["passive"]})
            if gguf is not None and dtype == "float32":
                configs.append({"impl": "llama.cpp (python binding, f32 GGUF)", "dtype": dtype, "tokens": n,
                                "cmd": [sys.executable, "-c", LLAMA_CPP_SCRIPT, str(gguf), str(n),
                                        str(len(os.sched_getaffinity(0))), PROMPT], "cold": False})
    for c in configs:
        c["walls"], c["compile_lines"], c["load"] = [], [], []
    with tempfile.TemporaryDirectory(prefix="sublayer-startup-") as tmp:
        for r in range(args.repeats):
            for i, c in enumerate(configs):
                env = clean_env(**c.get("env", {}))
                if c["cold"]:
                    env.update(cold_cache_env(Path(tmp) / f"cold-{r}-{i}", model_dir))
                c["load"].append(load_average())
                wall, err = timed(c["cmd"], env)
                c["walls"].append(wall)
                c["compile_lines"] += [line for line in err.splitlines() if line.startswith("compile:")]
                print(f"  {c['impl']:40s} {c['dtype']:8s} {c['tokens']:3d} tokens: {wall:6.2f} s "
                      f"(load average {c['load'][-1]})", file=sys.stderr, flush=True)
    for c in configs:
        c.pop("env", None)
        del c["cmd"]
        c["median_s"] = statistics.median(c["walls"])
    return configs


def step_times(args, burner: bool, threads: int, policy: str) -> dict:
    env = clean_env(**policy_env(policy))
    proc = None
    if burner:  # bounded: it exits by itself even if this process dies
        proc = subprocess.Popen([sys.executable, "-c", BURNER.format(seconds=args.burn_limit)])
    try:
        load = load_average()
        r = subprocess.run([sys.executable, "-c", STEPS_SCRIPT, str(threads), str(args.steps), args.step_dtype, PROMPT,
                            str(args.step_budget)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=args.burn_limit)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    if r.returncode != 0:
        raise RuntimeError(f"decode-step run failed: {r.stderr.strip()[-500:]}")
    t = sorted(json.loads(r.stdout.strip().splitlines()[-1]))
    row = {"burner": burner, "threads": threads, "policy": policy, "load": load, "steps": len(t),
           "median_ms": statistics.median(t) * 1e3, "p99_ms": t[min(len(t) - 1, int(0.99 * len(t)))] * 1e3,
           "max_ms": t[-1] * 1e3}
    print(f"  {'busy' if burner else 'idle'} {threads} threads {policy:7s}: median {row['median_ms']:.1f} ms, "
          f"p99 {row['p99_ms']:.1f} ms, max {row['max_ms']:.1f} ms (load average {load})", file=sys.stderr, flush=True)
    return row


def write_results(out: Path, walls: list[dict], steps: list[dict], meta: dict):
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps({"meta": meta, "wall": walls, "steps": steps}, indent=1) + "\n")
    lines = [f"# Start-up and decode under contention ({meta['date']})", "",
             f"torch {meta['torch']}, {meta['cores']} cores, SmolLM2-135M-Instruct, prompt {PROMPT!r}, greedy. "
             f"Load average (1 min) at each run in brackets: the machine was shared with other work.", "",
             "## Whole-process wall time", "",
             "| implementation | dtype | new tokens | median s | min-max s | runs | load average | compile line (ours) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in walls:
        compile_line = c["compile_lines"][0].split(" (")[0] if c["compile_lines"] else ""
        lines.append(f"| {c['impl']} | {c['dtype']} | {c['tokens']} | {c['median_s']:.2f} | {min(c['walls']):.2f}-"
                     f"{max(c['walls']):.2f} | {len(c['walls'])} | {min(c['load']):.1f}-{max(c['load']):.1f} | "
                     f"{compile_line} |")
    lines += ["", f"## Decode step times ({meta['step_dtype']}, up to {meta['steps']} steps within the time budget, "
                  f"one busy process or none)", "",
              "| competing process | threads | OpenMP wait | steps timed | median ms | p99 ms | max ms | load average |",
              "|---|---|---|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {'one busy loop' if s['burner'] else 'none'} | {s['threads']} | {s['policy']} | {s['steps']} | "
                     f"{s['median_ms']:.1f} | {s['p99_ms']:.1f} | {s['max_ms']:.1f} | {s['load']:.1f} |")
    (out / "startup.md").write_text("\n".join(lines) + "\n")
    plot(out / "startup.png", walls, steps)


def plot(path: Path, walls, steps):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = [f"{c['impl'].split(' (')[0].replace('sublayer CLI, ', '')}\n{c['dtype'][:4]} {c['tokens']}" for c in walls]
    med = [c["median_s"] for c in walls]
    err = [[m - min(c["walls"]) for m, c in zip(med, walls)], [max(c["walls"]) - m for m, c in zip(med, walls)]]
    a.bar(range(len(walls)), med, yerr=err, color=[("C0" if "warm" in c["impl"] else "C1" if "cold" in c["impl"]
                                                   else "C2" if "transformers" in c["impl"] else "C3") for c in walls])
    a.set_xticks(range(len(walls)), labels, rotation=90, fontsize=7)
    a.set_ylabel("whole-process wall time, s (median, min-max)")
    a.set_title("CLI run: sublayer warm/cold cache vs transformers vs llama.cpp")
    names = [f"{'busy' if s['burner'] else 'idle'}\n{s['threads']}t {s['policy']}" for s in steps]
    x = range(len(steps))
    b.bar([i - 0.2 for i in x], [s["median_ms"] for s in steps], 0.4, label="median")
    b.bar([i + 0.2 for i in x], [s["p99_ms"] for s in steps], 0.4, label="p99")
    b.set_yscale("log")
    b.set_xticks(list(x), names, fontsize=7)
    b.set_ylabel("decode step, ms (log)")
    b.set_title("decode steps with / without one competing busy process")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration, round-robin (default 3)")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--steps", type=int, default=256, help="decode steps per contention run (default 256)")
    p.add_argument("--step-dtype", default="bfloat16")
    p.add_argument("--step-budget", type=float, default=90,
                   help="seconds of decode steps per contention run at most (fewer steps are then timed)")
    p.add_argument("--spin-counts", default="", help="comma list of bounded spin counts (GOMP_SPINCOUNT) to time "
                   "besides spin (300000, libgomp's default) and passive, e.g. 10000,30000")
    p.add_argument("--burn-limit", type=int, default=600, help="seconds after which the burner exits by itself")
    p.add_argument("--skip", default="", help="comma list of parts to skip: wall, steps, peers (the transformers and llama.cpp runs)")
    p.add_argument("--out", default="bench/results/startup")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 10:
        raise UserError("--repeats: expected at least 1; --steps: at least 10")
    spins = [n.strip() for n in args.spin_counts.split(",") if n.strip()]
    if not all(n.isdigit() for n in spins):
        raise UserError(f"--spin-counts: expected a comma list of non-negative integers, got {args.spin_counts!r}")
    policies = list(POLICIES) + [f"spin {n}" for n in spins]
    from model.default_model import cache_root, resolve_model

    model_dir = resolve_model(None)
    gguf = cache_root() / "gguf" / "smollm2-135m-instruct-f32.gguf"
    from bench.llama_cpp_peer import available

    gguf = gguf if gguf.is_file() and available() else None
    cores = len(os.sched_getaffinity(0))
    warm = set() if "wall" in args.skip else {(d, cores) for d in args.dtypes.split(",")}
    warm |= set() if "steps" in args.skip else {(args.step_dtype, t) for t in (1, 2) if t <= cores}
    for dtype, threads in sorted(warm):  # the warm compile cache the runs below use (built once)
        subprocess.run([sys.executable, "-m", "runtime.compile_cache", "--dtype", dtype, "--threads", str(threads)],
                       cwd=ROOT, env=clean_env(), check=True)
    import torch

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "cores": cores, "steps": args.steps, "step_dtype": args.step_dtype,
            "load_at_start": load_average()}
    walls = [] if "wall" in args.skip else wall_times(args, model_dir, gguf)
    steps = []
    if "steps" not in args.skip:
        for burner in (False, True):
            for threads in (1, 2):
                if threads > cores:
                    continue
                for policy in policies:
                    steps.append(step_times(args, burner, threads, policy))
    meta["load_at_end"] = load_average()
    write_results(Path(args.out), walls, steps, meta)
    print(f"wrote {args.out}/startup.md, startup.json, startup.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
