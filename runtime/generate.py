"""``python -m runtime.generate``: generate text with a (possibly layer-dropped) Llama.

Generated text streams to stdout; the resolved plan, bytes and speed go to stderr as labelled lines.
"""

import argparse
import os
import sys
import time

from model.errors import UserError, cli_main
from runtime.threads import add_threads_arg, check_threads

# A cold compile cache and fewer new tokens than this (times rows): decode eagerly, build nothing
# (compiling the steps takes about a minute; eager SmolLM2 steps take 30-60 ms). More: decode eagerly
# while a background thread builds the compiled steps, then switch to them.
COLD_EAGER_TOKENS = 1024

MiB = 1024 * 1024


def add_generation_args(p: argparse.ArgumentParser):
    """The flags shared by every entry point that generates (CONVENTIONS.md)."""
    p.add_argument("--model", default=None,
                   help="checkpoint directory or known name (default: smollm2-135m-instruct)")
    p.add_argument("--plan", default=None, help="plan JSON path or preset name (default: full)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text")
    src.add_argument("--prompt-file", default=None, help="file with one prompt per line (a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV-cache positions (default: prompt + new tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 means off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_threads_arg(p)
    add_quant_args(p)


def add_quant_args(p: argparse.ArgumentParser):
    """--quant, --group-size, --quant-head (``runtime.load``'s quant, group_size, quant_head)."""
    p.add_argument("--quant", default=None,
                   help="quantize the kept projections at load time: none, int8 (one scale per output channel) "
                        "or int4 (groups of --group-size inputs)")
    p.add_argument("--group-size", type=int, default=None,
                   help="inputs per quantization group (int4: a multiple of 32, default 64; int8: default one "
                        "group per output channel)")
    p.add_argument("--quant-head", action="store_true", help="quantize the embedding and LM head too")


def check_args(args):
    from runtime.generation import check_sampling

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise UserError(f"--max-seq-len: expected a positive integer, got {args.max_seq_len}")


def read_prompts(args) -> list[str]:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompt-file: cannot read {args.prompt_file} ({e})") from None
        if not prompts:
            raise UserError(f"--prompt-file: {args.prompt_file} has no prompts (one per line expected)")
        return prompts
    return [args.prompt if args.prompt is not None else "Once upon a time"]


def report_engine(engine, seq_len: int, out=None):
    """Labelled lines: the resolved plan, weight bytes and KV-cache bytes vs the full model."""
    out = out or sys.stderr  # resolved per call: sys.stderr may be replaced after import
    print(f"plan: {engine.plan.describe()}", file=out)
    quant = f"; {engine.quant.describe()}" if engine.quant is not None else ""
    print(f"weights: {engine.weight_bytes / MiB:.1f} MiB (full {engine.full_weight_bytes / MiB:.1f} MiB{quant})", file=out)
    print(f"KV cache: {engine.kv_bytes(seq_len) / MiB:.1f} MiB for {seq_len} positions "
          f"(full {engine.kv_bytes(seq_len, full=True) / MiB:.1f} MiB)", file=out)


class Streamer:
    """Prints the single row's new text as tokens arrive: the text that decoding prompt + new ids adds
    after the decoded prompt (as ``Generation.texts``), held back while it ends in a partial character."""

    def __init__(self, tokenizer, prompt_ids):
        self.tok, self.eos, self.prompt, self.ids, self.shown = tokenizer, set(tokenizer.eos_ids), prompt_ids, [], ""

    def __call__(self, step, tokens):
        t = int(tokens[0])
        if t in self.eos:
            return
        self.ids.append(t)
        from runtime.generation import new_text

        text = new_text(self.tok, self.prompt, self.ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.generate", description=__doc__)
    add_generation_args(p)
    p.add_argument("--no-compile", action="store_true",
                   help="decode on the eager step (CPU: no inductor compile; GPU: no CUDA graph)")
    args = p.parse_args(argv)
    check_args(args)
    check_threads(args.threads)
    prompts = read_prompts(args)
    import runtime
    from runtime import fast_decode

    t0 = time.perf_counter()
    engine = runtime.load(args.model, plan=args.plan, dtype=args.dtype, device=args.device,
                          max_seq_len=args.max_seq_len, compile=not args.no_compile, quant=args.quant,
                          group_size=args.group_size, quant_head=args.quant_head, threads=args.threads)
    load_s = time.perf_counter() - t0
    ids = engine.encode_prompts(prompts, chat=args.chat)
    longest = max(len(i) for i in ids)
    engine.check_length(longest + args.max_new_tokens,
                        f"a prompt of {longest} tokens plus {args.max_new_tokens} new tokens")
    seq_len = args.max_seq_len or longest + args.max_new_tokens
    report_engine(engine, seq_len)
    print(f"load: {load_s:.2f} s ({engine.dtype}, {engine.device}, {torch_threads()} threads)", file=sys.stderr)
    fast_decode.cold_start = "eager" if args.max_new_tokens * len(ids) < COLD_EAGER_TOKENS else "background"
    stream = Streamer(engine.tokenizer, ids[0]) if len(ids) == 1 else None
    if stream is not None and not args.chat:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
    g = engine.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, on_token=stream)
    if stream is not None:
        sys.stdout.write("\n")
    else:
        for prompt, text in zip(prompts, g.texts):
            print(f"{prompt}{text}")
    report_speed(engine, g, len(ids), longest, args)
    if fast_decode.background_builds_pending():  # drop the unfinished build: exit without tearing it down
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def compile_line(engine, g, args) -> str:
    """The ``compile:`` line: what the first decode step did (or, with a cold compile cache on CPU,
    what the run did instead of waiting for the compiler)."""
    from runtime import fast_decode

    calls = fast_decode.CALLS
    if engine.decode_mode != "compiled":
        what = {"graph": "captures the CUDA graph", "eager": "eager, nothing compiled"}[engine.decode_mode]
        return f"compile: {g.first_step_s:.2f} s (the first decode step; it {what})"
    if not calls["cold eager"]:
        built = sum(fast_decode.BUILD_SECONDS.values())
        if calls["cache build"]:
            return f"compile: {g.first_step_s:.2f} s (the first decode step; it built {calls['cache build']} compiled " \
                   f"step(s) into the compile cache in {built:.1f} s)"
        return f"compile: {g.first_step_s:.2f} s (the first decode step; it loaded the compiled steps from the compile cache)"
    warm = f"python -m runtime.compile_cache --model {args.model or 'smollm2-135m-instruct'} --dtype {args.dtype}"
    if fast_decode.cold_start == "eager":
        return (f"compile: none (compile cache cold; {args.max_new_tokens} new tokens decode eagerly sooner than the steps "
                f"compile; warm it once with: {warm})")
    done = sum(fast_decode.BUILD_SECONDS.values())
    if fast_decode.background_builds_pending():
        return (f"compile: still running in the background when decoding ended (compile cache cold; every step ran "
                f"eagerly, and the unfinished build is dropped; warm it once with: {warm})")
    return (f"compile: {done:.1f} s in a background thread (compile cache cold; {calls['eager head']} steps ran eagerly "
            f"meanwhile; cached for the next run)")


def report_speed(engine, g, rows: int, prompt_len: int, args=None, out=None):
    """Labelled lines: prompt (prefill + first token), the first decode step (it compiles the step or
    captures the graph) on its own line, and decode as the steady-state step with achieved GB/s."""
    out = out or sys.stderr  # resolved per call: sys.stderr may be replaced after import
    print(f"prompt: {g.prompt_tokens} tokens in {g.prefill_s * 1e3:.1f} ms "
          f"({g.prompt_tokens / max(g.prefill_s, 1e-9):.1f} tokens/s, incl. first token)", file=out)
    if g.first_step_s:
        print(compile_line(engine, g, args), file=out)
    if g.decode_steps:
        s = g.decode_s / g.decode_steps
        context = prompt_len + 1 + g.decode_steps // 2  # cached positions at the middle step
        gbps = engine.step_bytes(context, rows) / s / 1e9
        print(f"decode: {s * 1e3:.2f} ms/token ({rows / s:.1f} tokens/s, {gbps:.1f} GB/s, {g.decode_steps} steps "
              f"after the first, batch {rows})", file=out)


if __name__ == "__main__":
    sys.exit(main())
