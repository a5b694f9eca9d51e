"""Decode latency per token of plans, ours vs Hugging Face eager, with the memory-bandwidth roofline.

    python bench/latency.py --plans full,attn66,imp-attn10 --context 512 --dtype float32

For each plan: bytes read per decode step (weights + KV at that context), ideal speedup over ``full``
(bytes_full / bytes_plan), our decode ms/token (median of --steps steps after warm-up, with the spread),
achieved bandwidth, and the same for Hugging Face ``LlamaForCausalLM`` (default attention = sdpa,
DynamicCache, no compile; labelled "HF eager") with the dropped modules' forwards replaced so that
nothing runs. Prints a table and writes CSV, markdown and a PNG under --out.
"""

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402
from model.errors import UserError  # noqa: E402

MiB = 2**20


def copy_bandwidth(nbytes=256 * MiB, repeats=5) -> float:
    """Machine bandwidth: (bytes read + bytes written) / time of a large copy, best of ``repeats``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def step_bytes(engine, context: int) -> int:
    """Bytes one decode step reads: every loaded weight except the embedding table (one row is read;
    a tied LM head still reads it whole) plus the KV cache up to ``context``."""
    w = engine.weight_bytes
    if not engine.config.tie_word_embeddings:
        w -= engine.embed.nbytes
    return w + engine.kv_bytes(context)


def time_ours(engine, prompt: torch.Tensor, steps: int, warmup: int) -> list[float]:
    T = prompt.shape[1]
    cache = engine.new_cache(1, T + warmup + steps)
    kv_start = torch.zeros(1, dtype=torch.int32)
    logits = engine.forward(prompt, cache, 0, kv_start, torch.arange(T)[None], last_only=True)
    times = []
    for i in range(warmup + steps):
        tok = logits[:, -1].argmax(-1, keepdim=True)
        pos = T + i
        t = time.perf_counter()
        logits = engine.forward(tok, cache, pos, kv_start, torch.tensor([[pos]]), last_only=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def hf_skipping(path, plan, dtype):
    """HF LlamaForCausalLM whose dropped sublayers (and their norms) do not run at all."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
    for i in plan.drop_attention:
        layer = hf.model.layers[i]
        layer.input_layernorm.forward = lambda x: x
        layer.self_attn.forward = lambda hidden_states, **kw: (torch.zeros_like(hidden_states), None)
    for i in plan.drop_mlp:
        layer = hf.model.layers[i]
        layer.post_attention_layernorm.forward = lambda x: x
        layer.mlp.forward = lambda x: torch.zeros_like(x)
    return hf


@torch.inference_mode()
def time_hf(hf, prompt: torch.Tensor, steps: int, warmup: int):
    """Explicit position_ids / cache_position: with layer 0's attention dropped HF would otherwise read
    the sequence length from an empty layer-0 cache. Returns (times, logits of the first decode step)."""
    from transformers import DynamicCache

    T = prompt.shape[1]
    cache = DynamicCache(config=hf.config)
    out = hf(prompt, cache=cache, use_cache=True, position_ids=torch.arange(T)[None],
             cache_position=torch.arange(T), logits_to_keep=1)
    times, first = [], None
    for i in range(warmup + steps):
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        pos = T + i
        t = time.perf_counter()
        out = hf(tok, cache=cache, use_cache=True, position_ids=torch.tensor([[pos]]),
                 cache_position=torch.tensor([pos]), logits_to_keep=1)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        if first is None:
            first = out.logits[0, -1].float()
    return times, first


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--plans", default="full,attn90,attn75,attn66,mlp90,mlp75,mlp66,block90,block75,block66")
    p.add_argument("--context", type=int, default=512, help="prompt tokens before timing decode")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-at", type=int, default=2048, help="also report KV bytes at this many positions")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face rows")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench/results/latency")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.context < 1 or args.steps < 1 or args.warmup < 0:
            raise UserError("--context and --steps must be positive, --warmup >= 0")
        plans = [s for s in args.plans.split(",") if s]
        bw = copy_bandwidth()
        print(f"machine: copy bandwidth {bw / 1e9:.1f} GB/s (read + write), torch threads {torch.get_num_threads()}",
              file=sys.stderr)
        rows = []
        for name in plans:
            engine = runtime.load(args.model, plan=name, dtype=args.dtype, device="cpu")
            prompt = torch.randint(3, engine.config.vocab_size, (1, args.context),
                                   generator=torch.Generator().manual_seed(0))
            ours = time_ours(engine, prompt, args.steps, args.warmup)
            row = {"plan": engine.plan.name, "dtype": args.dtype, "context": args.context,
                   "attn_dropped": len(engine.plan.drop_attention), "mlp_dropped": len(engine.plan.drop_mlp),
                   "weights_MiB": engine.weight_bytes / MiB, "kv_MiB_at_ctx": engine.kv_bytes(args.context) / MiB,
                   f"kv_MiB_at_{args.kv_at}": engine.kv_bytes(args.kv_at) / MiB,
                   "step_MiB": step_bytes(engine, args.context) / MiB,
                   "ours_ms": statistics.median(ours) * 1e3,
                   "ours_spread_ms": (max(ours) - min(ours)) * 1e3}
            row["ours_GBps"] = step_bytes(engine, args.context) / (row["ours_ms"] / 1e3) / 1e9
            if not args.no_hf:
                hf = hf_skipping(engine.checkpoint_dir, engine.plan, engine.dtype)
                hf_times, hf_first = time_hf(hf, prompt, args.steps, args.warmup)
                cache = engine.new_cache(1, args.context + 1)
                kv0 = torch.zeros(1, dtype=torch.int32)
                lg = engine.forward(prompt, cache, 0, kv0, torch.arange(args.context)[None], last_only=True)
                tok = lg[:, -1].argmax(-1, keepdim=True)
                mine = engine.forward(tok, cache, args.context, kv0, torch.tensor([[args.context]]))[0, -1].float()
                row["hf_ms"] = statistics.median(hf_times) * 1e3
                row["hf_spread_ms"] = (max(hf_times) - min(hf_times)) * 1e3
                row["hf_rel_err"] = float((mine - hf_first).norm() / hf_first.norm())
                del hf
            rows.append(row)
            print(fmt_row(row), file=sys.stderr)
            del engine
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    full = next((r for r in rows if r["plan"] == "full"), None)
    if full:
        for r in rows:
            r["ideal_speedup"] = full["step_MiB"] / r["step_MiB"]
            r["ours_speedup"] = full["ours_ms"] / r["ours_ms"]
            if "hf_ms" in r:
                r["hf_speedup"] = full["hf_ms"] / r["hf_ms"]
    write(rows, Path(args.out), args, bw)
    return 0


def fmt_row(r) -> str:
    s = (f"{r['plan']:>16}: weights {r['weights_MiB']:7.1f} MiB, KV {r['kv_MiB_at_ctx']:5.1f} MiB, "
         f"ours {r['ours_ms']:6.2f} ms/token (spread {r['ours_spread_ms']:.2f}, {r['ours_GBps']:.1f} GB/s)")
    if "hf_ms" in r:
        s += f", HF eager {r['hf_ms']:6.2f} ms/token (rel err of logits vs ours {r['hf_rel_err']:.1e})"
    return s


def write(rows, out: Path, args, bw):
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"latency_{args.dtype}_ctx{args.context}"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    cols = ["plan", "weights_MiB", f"kv_MiB_at_{args.kv_at}", "step_MiB", "ideal_speedup", "ours_ms",
            "ours_speedup", "ours_GBps", "hf_ms", "hf_speedup"]
    cols = [c for c in cols if c in keys]
    lines = [f"Command: `python bench/latency.py {' '.join(sys.argv[1:])}`  ",
             f"CPU, {torch.get_num_threads()} threads, dtype {args.dtype}, decode after a {args.context}-token "
             f"prompt, median of {args.steps} steps; copy bandwidth {bw / 1e9:.1f} GB/s. HF eager = "
             f"LlamaForCausalLM (sdpa, DynamicCache, no compile) with dropped modules not run.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                      for c in cols) + " |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["ours_ms"] for r in rows], 0.4, label="sublayer")
    if all("hf_ms" in r for r in rows):
        ax.bar([i + 0.2 for i in x], [r["hf_ms"] for r in rows], 0.4, label="HF eager (dropped modules skipped)")
    if "ideal_speedup" in rows[0]:
        ax.plot(list(x), [rows[0]["ours_ms"] / r["ideal_speedup"] for r in rows], "k_", markersize=20,
                label="bandwidth-ideal (ours, full / ideal speedup)")
    ax.set_xticks(list(x), [r["plan"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("decode ms / token")
    ax.set_title(f"Decode latency, batch 1, CPU, {args.dtype}, {args.context}-token context")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=120)
    print(f"wrote {stem}.csv, .md, .png", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
