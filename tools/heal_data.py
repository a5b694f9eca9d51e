"""Training text for healing: the full model's own generations from a prompts file, and guarded files.

``python -m tools.heal_data --model M --samples N`` generates (or completes) the cache alone, so it can
run ahead of training. Generations are cached under ``~/.cache/sublayer/heal-data/KEY/`` where KEY
hashes the model, the prompts and the sampling settings, in files of ``SHARD`` samples
(``shard-NNNNN.jsonl``, written to a temporary file and renamed), so an interrupted run resumes at the
next missing shard. Sample i continues prompt ``i mod P`` at the i-th (temperature, chat template)
variant, with its own seed; asking for more samples later adds passes over the prompts.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model.errors import UserError, cli_main
from runtime.scheduler import Scheduler

PROMPTS = Path(__file__).resolve().parent / "heal_prompts.txt"
EVAL_SUMS = Path(__file__).resolve().parent / "eval_data.sha256"


def read_prompts(path=PROMPTS) -> list[str]:
    """One prompt per line; ``\\n`` in a line is a newline, ``\\\\`` a backslash; blank lines skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the prompts file ({e})") from None
    prompts = [_unescape(line) for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def _unescape(line: str) -> str:
    out, i = [], 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line) and line[i + 1] in "n\\":
            out.append("\n" if line[i + 1] == "n" else "\\")
            i += 2
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_training_file(path, sums=EVAL_SUMS):
    """UserError if ``path`` is one of the evaluation data sets' files (its SHA-256 in ``sums``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--train-text: {p}: no such file")
    listed = {}
    for line in Path(sums).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            listed[digest] = name
    digest = sha256_file(p)
    if digest in listed:
        raise UserError(f"--train-text: {p} is the evaluation file {listed[digest]} (SHA-256 listed in "
                        f"{Path(sums).name}); evaluation text must never train a model")


def _model_identity(checkpoint: Path) -> dict:
    files = sorted(checkpoint.glob("*.safetensors"))
    return {"name": checkpoint.name, "config": sha256_file(checkpoint / "config.json"),
            "weights": [(f.name, f.stat().st_size) for f in files]}


def cache_dir(checkpoint: Path, prompts_path, settings: dict) -> Path:
    from model.default_model import cache_root

    key = {"model": _model_identity(checkpoint), "prompts": sha256_file(prompts_path), **settings}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "heal-data" / f"{checkpoint.name}-{digest}"


SHARD = 64  # samples per cache file


def sample_plan(i: int, prompts: list[str], temperatures, chat_modes) -> tuple[int, float, bool]:
    """Sample ``i``'s (prompt index, temperature, chat template on/off): prompts cycle through the file,
    the (temperature, chat) variants cycle with ``i``, so over passes every prompt meets every variant
    when the two cycle lengths share no factor."""
    variants = [(t, c) for t in temperatures for c in chat_modes]
    t, c = variants[i % len(variants)]
    return i % len(prompts), t, c


def self_generate(model, samples: int, prompts_path=PROMPTS, max_new_tokens: int = 512,
                  temperatures=(0.7, 1.0), chat_modes=None, top_p: float = 0.95, seed: int = 0,
                  dtype: str = "bfloat16", slots: int = 32, progress: bool = True) -> list[list[int]]:
    """Token ids (prompt + generation) of the first ``samples`` cached generations, generating the
    missing ones first. Returns [samples] lists of ints. ``chat_modes``: whether a sample's prompt goes
    through the chat template; default both (False, True) where the checkpoint has one, else (False,).

    Generation is continuous batching (``runtime.scheduler``): ``slots`` rows decode together and a row
    that reaches EOS takes the next prompt at once, so no step is spent on finished rows; top-p sampling
    looks for the nucleus in the top tokens first (``runtime.sampling.nucleus_topk``). Sample i has its
    own generator seeded ``seed * 2**32 + i`` (its tokens do not depend on which samples share the batch,
    up to the batch's float rounding), so ``slots`` is not part of the cache key. Files hold ``SHARD``
    samples each (``shard-NNNNN.jsonl``, written to a temporary file and renamed when all of its samples
    are done), so an interrupted run loses at most the shards in flight."""
    from model.default_model import resolve_model

    if samples < 1:
        raise UserError(f"--self-generate: expected a positive number of samples, got {samples}")
    if slots < 1:
        raise UserError(f"--slots: expected a positive integer, got {slots}")
    checkpoint = resolve_model(model, show_progress=progress)
    prompts = read_prompts(prompts_path)
    if chat_modes is None:
        chat_modes = (False, True) if _has_chat_template(checkpoint) else (False,)
    settings = {"batching": "continuous", "shard": SHARD, "max_new_tokens": max_new_tokens,
                "temperatures": list(temperatures), "chat": list(chat_modes), "top_p": top_p, "seed": seed,
                "dtype": dtype}
    out = cache_dir(checkpoint, prompts_path, settings)
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "settings.json"
    if not meta.exists():
        meta.write_text(json.dumps({"model": str(checkpoint.name), "prompts": Path(prompts_path).name, **settings},
                                   indent=2) + "\n")
    shards = -(-samples // SHARD)
    missing = [s for s in range(shards) if not (out / f"shard-{s:05d}.jsonl").exists()]
    if missing:
        _generate_shards(checkpoint, out, missing, prompts, max_new_tokens, temperatures, chat_modes, top_p,
                         seed, dtype, slots, progress)
    ids = []
    for s in range(shards):
        for line in (out / f"shard-{s:05d}.jsonl").read_text().splitlines():
            ids.append(json.loads(line)["ids"])
    return ids[:samples]


def _has_chat_template(checkpoint: Path) -> bool:
    from model.config import load_config
    from model.tokenizer import Tokenizer

    config = load_config(checkpoint)
    return bool(Tokenizer(checkpoint, config.bos_token_id, config.eos_token_ids).chat_template)


def _generate_shards(checkpoint, out: Path, shards: list[int], prompts, max_new_tokens, temperatures, chat_modes,
                     top_p, seed, dtype, slots, progress):
    import threading

    import runtime
    from runtime.scheduler import SamplingParams, Sequence

    engine = runtime.load(checkpoint, dtype=dtype, show_progress=progress)
    eos = set(engine.tokenizer.eos_ids)
    seqs, rows = [], {}  # rows: sample index -> its JSON line once done
    done = threading.Condition()
    for s in shards:
        for i in range(s * SHARD, (s + 1) * SHARD):
            p, t, chat = sample_plan(i, prompts, temperatures, chat_modes)
            params = SamplingParams(max_tokens=max_new_tokens, temperature=t, top_p=top_p, seed=seed * 2**32 + i)
            seq = Sequence(engine.encode_prompts(prompts[p], chat)[0], params, None)
            seq.emit = _on_event(seq, i, p, t, chat, eos, rows, done)
            seqs.append(seq)
    longest = max(len(q.prompt_ids) for q in seqs) + max_new_tokens
    sched = Scheduler(engine, min(slots, len(seqs)), longest, max_queue=len(seqs))
    sched.warm_up()
    bar = tqdm(total=len(seqs), desc="self-generate", unit="sample", disable=not progress, file=sys.stderr)
    t0, made, pending = time.perf_counter(), 0, list(shards)
    sched.start()
    try:
        sched.submit(seqs)
        while pending:
            with done:
                done.wait(timeout=5)
                finished = len(rows)
            bar.update(finished - bar.n)
            if any(r.get("error") for r in list(rows.values())):
                raise UserError("self-generate: " + next(r["error"] for r in rows.values() if r.get("error")))
            made = sum(len(q.out) for q in seqs)  # finished and in flight
            bar.set_postfix(tokens_per_s=f"{made / (time.perf_counter() - t0):.1f}", steps=sched.steps)
            for s in list(pending):
                lines = [rows.get(i) for i in range(s * SHARD, (s + 1) * SHARD)]
                if all(lines):
                    tmp = out / f".shard-{s:05d}.{os.getpid()}.tmp"
                    tmp.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "new"}) + "\n"
                                           for r in lines))
                    os.replace(tmp, out / f"shard-{s:05d}.jsonl")
                    pending.remove(s)
    finally:
        sched.stop()
        bar.close()
    elapsed = time.perf_counter() - t0
    print(f"self-generate: {made} new tokens in {elapsed:.0f} s ({made / elapsed:.1f} tokens/s, "
          f"{sched.steps} decode steps of up to {sched.slots} rows)", file=sys.stderr)


def _on_event(seq, i, prompt, temperature, chat, eos, rows, done):
    def emit(event):
        kind, value = event
        if kind == "text":
            return
        with done:
            if kind == "error":
                rows[i] = {"error": value}
            else:
                new = [t for t in seq.out if t not in eos]
                rows[i] = {"sample": i, "prompt": prompt, "temperature": temperature, "chat": chat,
                           "ids": seq.prompt_ids + new, "new": len(new)}
            done.notify()
    return emit


def token_stream_windows(sequences: list[list[int]], seq_len: int, separator: int | None) -> torch.Tensor:
    """[N, seq_len] int64: the sequences joined (``separator`` between them) and cut into disjoint windows."""
    flat = []
    for s in sequences:
        flat.extend(s)
        if separator is not None:
            flat.append(separator)
    n = len(flat) // seq_len
    if n == 0:
        raise UserError(f"training text: {len(flat)} tokens, fewer than one window of --seq-len {seq_len}")
    return torch.tensor(flat[:n * seq_len], dtype=torch.long).view(n, seq_len)


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--temperatures: expected comma-separated numbers, got {text!r}") from None


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.heal_data", description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--samples", type=int, required=True, help="generations to have in the cache")
    p.add_argument("--prompts", default=str(PROMPTS))
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperatures", type=floats, default=[0.7, 1.0], help="cycled per sample (default 0.7,1.0)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--slots", type=int, default=32, help="rows decoding together (not part of the cache key)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = self_generate(args.model, args.samples, args.prompts, args.max_new_tokens, args.temperatures,
                        top_p=args.top_p, seed=args.seed, dtype=args.dtype, slots=args.slots)
    print(f"cached: {len(ids)} generations, {sum(map(len, ids))} tokens (prompts included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
