"""Training text for healing: the full model's own generations from a prompts file, and guarded files.

``python -m tools.heal_data --model M --samples N`` generates (or completes) the cache alone, so it can
run ahead of training. Generations are cached under ``~/.cache/sublayer/heal-data/KEY/`` where KEY
hashes the model, the prompts and the sampling settings; one shard per batch (``batch-NNNNN.jsonl``,
written to a temporary file and renamed), so an interrupted run resumes at the next missing batch.
Batch b samples prompts b*B .. b*B+B-1 (cycling through the file) with seed ``seed + b``.
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


def self_generate(model, samples: int, prompts_path=PROMPTS, batch_size: int = 32, max_new_tokens: int = 256,
                  temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, dtype: str = "bfloat16",
                  progress: bool = True) -> list[list[int]]:
    """Token ids (prompt + generation) of the first ``samples`` cached generations, generating the
    missing batches first. Returns [samples] lists of ints."""
    from model.default_model import resolve_model

    if samples < 1:
        raise UserError(f"--self-generate: expected a positive number of samples, got {samples}")
    checkpoint = resolve_model(model, show_progress=progress)
    prompts = read_prompts(prompts_path)
    settings = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed, "dtype": dtype}
    out = cache_dir(checkpoint, prompts_path, settings)
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "settings.json"
    if not meta.exists():
        meta.write_text(json.dumps({"model": str(checkpoint.name), "prompts": Path(prompts_path).name, **settings},
                                   indent=2) + "\n")
    batches = -(-samples // batch_size)
    missing = [b for b in range(batches) if not (out / f"batch-{b:05d}.jsonl").exists()]
    if missing:
        import runtime

        engine = runtime.load(checkpoint, dtype=dtype, show_progress=progress)
        bar = tqdm(missing, desc="self-generate", unit="batch", disable=not progress, file=sys.stderr)
        made, t0 = 0, time.perf_counter()
        for b in bar:
            rows = [prompts[(b * batch_size + i) % len(prompts)] for i in range(batch_size)]
            gen = engine.generate(rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed + b)
            prompt_ids = engine.encode_prompts(rows)
            eos = set(engine.tokenizer.eos_ids)
            lines = []
            for i, (p, new) in enumerate(zip(prompt_ids, gen.tokens)):
                new = [t for t in new if t not in eos]
                lines.append(json.dumps({"prompt": (b * batch_size + i) % len(prompts), "ids": p + new}))
                made += len(new)
            tmp = out / f".batch-{b:05d}.{os.getpid()}.tmp"
            tmp.write_text("\n".join(lines) + "\n")
            os.replace(tmp, out / f"batch-{b:05d}.jsonl")
            bar.set_postfix(tokens_per_s=f"{made / (time.perf_counter() - t0):.0f}")
        bar.close()
    ids = []
    for b in range(batches):
        for line in (out / f"batch-{b:05d}.jsonl").read_text().splitlines():
            ids.append(json.loads(line)["ids"])
    return ids[:samples]


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


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.heal_data", description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--samples", type=int, required=True, help="generations to have in the cache")
    p.add_argument("--prompts", default=str(PROMPTS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = self_generate(args.model, args.samples, args.prompts, args.batch_size, args.max_new_tokens,
                        args.temperature, args.top_p, args.seed, args.dtype)
    print(f"cached: {len(ids)} generations, {sum(map(len, ids))} tokens (prompts included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
