"""Load generator for ``python -m runtime.serve``: throughput, time to first token, inter-token latency.

    python -m bench.serve --url http://127.0.0.1:8000/v1 --requests 64 --concurrency 1,4,16
    python -m bench.serve --launch --model smollm2-135m-instruct --plans full,imp-attn10 --kv-memory 90M \\
        --max-seq-len 256 --max-batch 16 --concurrency 1,4,16 --out bench/results/serve/cpu

Each run sends ``--requests`` streamed completions, at most ``--concurrency`` in flight (asyncio, the
``openai`` client, ``max_retries=0``). Prompts are token ids drawn at random (seeded) with lengths from
``--prompt-lens``; each request asks for a length from ``--output-lens`` with ``ignore_eos`` (so every
answer has exactly that many tokens) and greedy decoding. Reported per run: output tokens/s over the
wall time, requests/s, time to first token and inter-token latency percentiles (p50/p90/p99), the most
requests the server ran at once (polled from /metrics), and every error (a request that did not end
with its full answer counts as one). With ``--launch`` each plan gets its own server process (same
``--kv-memory``), and its resident memory is read at the start and end of its runs; ``--soak S`` adds a
run of S seconds at the highest concurrency. Writes serve.json, serve.csv, serve.md and serve.png under
``--out``.
"""

import argparse
import asyncio
import csv
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench.flags import int_list
from model.errors import UserError, cli_main


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def get(url: str, timeout=5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def running_now(base: str) -> int:
    text = get(base + "/metrics")
    m = re.search(r"^sublayer_requests_running (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


async def one_request(client, model, prompt, max_tokens):
    """(ttft_s, inter-token gaps, tokens, error or None) of one streamed completion."""
    t0 = time.perf_counter()
    last, ttft, gaps, tokens, finish = None, None, [], 0, None
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                if ttft is None:
                    ttft = now - t0
                else:
                    gaps.append(now - last)
                last = now
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # every failure is counted and named, never dropped
        return ttft, gaps, tokens, f"{type(e).__name__}: {str(e)[:120]}"
    if finish != "length" or tokens != max_tokens:
        return ttft, gaps, tokens, f"incomplete answer: {tokens}/{max_tokens} tokens, finish_reason {finish}"
    return ttft, gaps, tokens, None


async def run_load(base, model, vocab, requests, concurrency, prompt_lens, output_lens, seed, duration=None):
    """One run: ``requests`` requests (or as many as fit in ``duration`` seconds) at ``concurrency``."""
    from openai import AsyncOpenAI

    rng = random.Random(seed)
    client = AsyncOpenAI(base_url=base + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "none"), max_retries=0,
                         timeout=600)
    results, peak = [], 0
    sem = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    stop = asyncio.Event()

    def job():
        n = rng.choice(prompt_lens)
        return [rng.randrange(3, vocab) for _ in range(n)], rng.choice(output_lens)

    async def worker(prompt, max_tokens):
        async with sem:
            results.append(await one_request(client, model, prompt, max_tokens))

    async def poll():
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, await asyncio.to_thread(running_now, base))
            except OSError:
                pass
            await asyncio.sleep(0.2)

    poller = asyncio.create_task(poll())
    if duration is None:
        await asyncio.gather(*(worker(*job()) for _ in range(requests)))
    else:
        async def loop_worker():
            while time.perf_counter() - start < duration:
                prompt, n = job()
                results.append(await one_request(client, model, prompt, n))
        await asyncio.gather(*(loop_worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    stop.set()
    await poller
    await client.close()
    ttfts = [r[0] for r in results if r[0] is not None and r[3] is None]
    gaps = [g for r in results if r[3] is None for g in r[1]]
    tokens = sum(r[2] for r in results)
    errors = [r[3] for r in results if r[3] is not None]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors),
            "error_examples": sorted(set(errors))[:3], "wall_s": round(wall, 2),
            "output_tokens": tokens, "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(results) / wall, 3),
            "ttft_ms_p50": ms(percentile(ttfts, 50)), "ttft_ms_p90": ms(percentile(ttfts, 90)),
            "ttft_ms_p99": ms(percentile(ttfts, 99)), "itl_ms_p50": ms(percentile(gaps, 50)),
            "itl_ms_p90": ms(percentile(gaps, 90)), "itl_ms_p99": ms(percentile(gaps, 99)),
            "peak_running": peak}


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class RssSampler:
    """Samples a process's resident memory every ``every`` seconds in a daemon thread: [(s, MiB)]."""

    def __init__(self, pid: int, every: float = 10.0):
        self.pid, self.every, self.samples, self.t0 = pid, every, [], time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            mib = rss_mib(self.pid)
            if mib is not None:
                self.samples.append((round(time.perf_counter() - self.t0, 1), mib))
            self._stop.wait(self.every)

    def stop(self) -> list:
        self._stop.set()
        self._thread.join()
        return self.samples


def model_info(base: str) -> dict:
    return json.loads(get(base + "/v1/models"))["data"][0]


class LaunchedServer:
    """``python -m runtime.serve`` for one plan, in a subprocess; its log in a temporary file."""

    def __init__(self, args, plan: str, port: int):
        cmd = [sys.executable, "-m", "runtime.serve", "--plan", plan, "--port", str(port), "--kv-memory", args.kv_memory,
               "--max-batch", str(args.max_batch), "--max-queue", str(max(64, args.requests))]
        if args.model:
            cmd += ["--model", args.model]
        if args.max_seq_len:
            cmd += ["--max-seq-len", str(args.max_seq_len)]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sublayer-serve-", suffix=".log")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + args.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise UserError(f"the server for plan {plan!r} exited ({self.proc.returncode}):\n{self.read_log()}")
            try:
                get(self.base + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    self.close()
                    raise UserError(f"the server for plan {plan!r} did not answer within --start-timeout "
                                    f"{args.start_timeout} s:\n{self.read_log()}")
                time.sleep(1)

    def read_log(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def write_results(out: Path, meta: dict, rows: list[dict]):
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    cols = ["plan", "slots", "concurrency", "requests", "errors", "wall_s", "output_tokens", "tokens_per_s",
            "requests_per_s", "peak_running", "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "itl_ms_p50",
            "itl_ms_p90", "itl_ms_p99"]
    with open(out / "serve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Serving load: {meta['model']}", "", "```", meta["command"], "```", "",
             f"KV memory {meta.get('kv_memory')}, max-seq-len {meta.get('max_seq_len')}, prompts of "
             f"{meta['prompt_lens']} tokens, answers of {meta['output_lens']} tokens (greedy, ignore_eos).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    for plan, rss in meta.get("rss_mib", {}).items():
        lines.append(f"\nServer RSS ({plan}): {rss['start']} MiB after warm-up, {rss['end']} MiB at the end.")
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    series = {plan: r["series"] for plan, r in meta.get("rss_mib", {}).items() if r.get("series")}
    fig, axes = plt.subplots(1, 3 if series else 2, figsize=(15 if series else 10, 4))
    for plan in dict.fromkeys(r["plan"] for r in rows):
        mine = [r for r in rows if r["plan"] == plan and r.get("kind") != "soak"]
        conc = [r["concurrency"] for r in mine]
        axes[0].plot(conc, [r["tokens_per_s"] for r in mine], "o-", label=f"{plan} ({mine[0]['slots']} slots)")
        axes[1].plot(conc, [r["peak_running"] for r in mine], "o-", label=plan)
    axes[0].set(xlabel="concurrency", ylabel="output tokens/s", title="throughput", xscale="log")
    axes[1].set(xlabel="concurrency", ylabel="requests running at once (peak)", title="served concurrently",
                xscale="log")
    for plan, samples in series.items():
        axes[2].plot([t for t, _ in samples], [m for _, m in samples], label=plan)
    if series:
        axes[2].set(xlabel="seconds since warm-up", ylabel="server RSS (MiB)", title="server memory over the runs")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "serve.png", dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server's base URL (…/v1); or use --launch")
    p.add_argument("--launch", action="store_true", help="start python -m runtime.serve per plan")
    p.add_argument("--model", default=None, help="--launch: the model; else the served id (default: the server's)")
    p.add_argument("--plans", default="full", help="--launch: comma-separated plans (default full)")
    p.add_argument("--kv-memory", default="256M")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--port", type=int, default=8123, help="--launch: the port of the launched servers")
    p.add_argument("--start-timeout", type=int, default=900, help="--launch: seconds to wait for start-up (compile)")
    p.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--prompt-lens", default="32,128")
    p.add_argument("--output-lens", default="32,64")
    p.add_argument("--soak", type=float, default=0, help="seconds of a last run at the highest concurrency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for serve.json/csv/md/png")
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    if bool(args.url) == bool(args.launch):
        raise UserError("pass either --url (a running server) or --launch")
    conc, plens, olens = int_list(args.concurrency, "--concurrency"), int_list(args.prompt_lens, "--prompt-lens"), \
        int_list(args.output_lens, "--output-lens")
    if args.requests < 1:
        raise UserError(f"--requests: expected an integer >= 1, got {args.requests}")
    rows, rss = [], {}
    meta = {"command": "python -m bench.serve " + " ".join(sys.argv[1:] if argv is None else argv),
            "prompt_lens": plens, "output_lens": olens, "requests": args.requests, "cpus": os.cpu_count(),
            "kv_memory": args.kv_memory if args.launch else None, "max_seq_len": args.max_seq_len}
    targets = [(p, None) for p in args.plans.split(",")] if args.launch else [(None, args.url.rstrip("/").removesuffix("/v1"))]
    for plan, base in targets:
        server = LaunchedServer(args, plan, args.port) if args.launch else None
        base = server.base if server else base
        try:
            info = model_info(base)
            meta["model"] = info["id"]
            plan_name = info["plan"]["name"]
            meta.setdefault("max_seq_len", info["max_model_len"])
            slots = info["kv"]["slots"]
            print(f"{plan_name}: {slots} slots x {info['kv']['positions_per_slot']} positions", file=sys.stderr)
            asyncio.run(run_load(base, info["id"], info["vocab_size"], 2, 2, plens[:1], [4], args.seed))  # warm-up
            start_rss = rss_mib(server.proc.pid) if server else None
            sampler = RssSampler(server.proc.pid) if server else None
            runs = [(c, None) for c in conc] + ([(max(conc), args.soak)] if args.soak else [])
            for c, duration in runs:
                row = asyncio.run(run_load(base, info["id"], info["vocab_size"], args.requests, c, plens, olens,
                                           args.seed, duration))
                row = {"plan": plan_name, "slots": slots, "kind": "soak" if duration else "load", **row}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
            if server:
                rss[plan_name] = {"start": start_rss, "end": rss_mib(server.proc.pid), "series": sampler.stop()}
                print(f"{plan_name}: server RSS {rss[plan_name]['start']} -> {rss[plan_name]['end']} MiB", file=sys.stderr)
        finally:
            if server:
                server.close()
    meta["rss_mib"] = rss
    if args.out:
        write_results(Path(args.out), meta, rows)
        print(f"wrote {args.out}/serve.md", file=sys.stderr)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
