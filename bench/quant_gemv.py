"""The CPU one-row quantized projection inside the decode step: the C++ kernel
(``kernels.quant_gemv_cpu``) against inductor's fused loop (``runtime.step.quant_multiply_reduce``, the
fallback where the kernel cannot be built). Each process decodes with one of the two (their compiled
steps are separate compile-cache entries); processes alternate round-robin, and each step's time is
split by step function (attention, MLP, head, and the Python around them).

    python -m bench.quant_gemv [--quants int8,int4-g32] [--context 128] [--repeats 3] [--steps 64]

Prints a markdown table: medians over the processes of each one's mean time per token.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

from bench.flags import int_list
from model.errors import UserError, cli_main

VARIANTS = ("kernel", "loop")


def worker(variant: str, quant: str, context: int, steps: int) -> dict:
    """One process: SmolLM2 float32 with ``quant`` (+ head), ``steps`` decode steps after warm-up."""
    import collections

    import torch

    import runtime
    from kernels import quant_gemv_cpu
    from runtime import fast_decode

    if variant == "loop":
        quant_gemv_cpu._available = False
    fast_decode.cold_start = "build"
    kind, _, group = quant.partition("-g")
    engine = runtime.load(None, dtype="float32", quant=kind, group_size=int(group) if group else None,
                          quant_head=True, threads=2, show_progress=False)
    cache = engine.new_cache(1, context + 16)
    with torch.inference_mode():
        engine.forward(torch.randint(0, 1000, (1, context)), cache, 0, torch.zeros(1, dtype=torch.int32),
                       torch.arange(context)[None])
    seconds = collections.Counter()
    compiled = fast_decode.compiled_steps()

    def timed(name, fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds[name] += time.perf_counter() - t
            return out
        return run

    fast_decode.compiled_steps = lambda: fast_decode.Steps(*(timed(n, f) for n, f in zip(fast_decode.Steps._fields,
                                                                                            compiled)))
    token = torch.tensor([[5]])
    for i in range(steps // 4 + 2):  # warm-up
        engine.decode_step(token, cache, torch.tensor([context + i % 8]))
    seconds.clear()
    t0 = time.perf_counter()
    for i in range(steps):
        engine.decode_step(token, cache, torch.tensor([context + i % 8]))
    total = (time.perf_counter() - t0) / steps
    per = {k: v / steps for k, v in seconds.items()}
    return {"step": total, **per, "other": total - sum(per.values())}


def run_worker(variant, quant, context, steps) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.quant_gemv", "--worker", variant, quant, str(context),
                          str(steps)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {variant} {quant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@cli_main
def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--worker"]:
        variant, quant, context, steps = sys.argv[2:6]
        print(json.dumps(worker(variant, quant, int(context), int(steps))))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.quant_gemv", description=__doc__.split("\n\n")[0])
    p.add_argument("--quants", default="int8,int4-g32", help="schemes: int8, int8-gN, int4-gN (default int8,int4-g32)")
    p.add_argument("--context", default="128", help="tokens in the cache before the timed steps (default 128)")
    p.add_argument("--repeats", default="3", help="processes per variant and scheme (default 3)")
    p.add_argument("--steps", default="64", help="timed decode steps per process (default 64)")
    args = p.parse_args(argv)
    context, = int_list(args.context, "--context")
    repeats, = int_list(args.repeats, "--repeats")
    steps, = int_list(args.steps, "--steps")
    quants = [q for q in args.quants.split(",") if q]
    for q in quants:
        kind, _, group = q.partition("-g")
        if kind not in ("int8", "int4") or (group and not group.isdigit()) or (kind == "int4" and not group):
            raise UserError(f"--quants: expected int8, int8-gN or int4-gN, got {q!r}")
    runs = {(q, v): [] for q in quants for v in VARIANTS}
    for r in range(repeats):  # round-robin: both variants see the same machine
        for q in quants:
            for v in VARIANTS:
                runs[q, v].append(run_worker(v, q, context, steps))
                print(f"[{r + 1}/{repeats}] {q} {v}: {runs[q, v][-1]['step'] * 1e3:.2f} ms", file=sys.stderr)
    print(f"SmolLM2-135M float32 activations, quantized projections and head, batch 1, context {context}, "
          f"2 threads; ms per token, median of {repeats} processes (round-robin), each the mean of {steps} "
          f"steps; split by compiled step function.\n")
    print("| scheme | one-row projection | step ms | attention | MLP | head | Python around | step vs loop |")
    print("|---|---|---|---|---|---|---|---|")
    for q in quants:
        med = {v: {k: statistics.median(r[k] for r in runs[q, v]) for k in runs[q, v][0]} for v in VARIANTS}
        for v in VARIANTS:
            m = med[v]
            print(f"| {q} | {'C++ kernel' if v == 'kernel' else 'inductor loop'} | {m['step'] * 1e3:.2f} | "
                  f"{m['attention'] * 1e3:.2f} | {m['mlp'] * 1e3:.2f} | {m['head'] * 1e3:.2f} | "
                  f"{m['other'] * 1e3:.2f} | {m['step'] / med['loop']['step']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
