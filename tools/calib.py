"""Calibration and evaluation text: read plain text or JSONL, tokenise, cut into disjoint windows."""

import json
from pathlib import Path

import torch

from model.errors import UserError

WIKITEXT2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.nonempty.raw"


def read_text(path, field: str = "text") -> str:
    """Whole text of ``path``: a plain-text file, or JSONL whose objects carry ``field``."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read calibration text ({e})") from None
    if p.suffix == ".jsonl":
        parts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}: line {n} is not JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise UserError(f"{p}: line {n} has no string field '{field}'")
            parts.append(obj[field])
        raw = "\n\n".join(parts)
    if not raw.strip():
        raise UserError(f"{p}: empty calibration text")
    return raw


def token_windows(tokenizer, path, seq_len: int, n: int | None = None, start_fraction: float = 0.0,
                  field: str = "text") -> torch.Tensor:
    """[N, seq_len] int64: disjoint windows of the tokenised text, starting at ``start_fraction`` of it.

    ``n`` None takes every whole window. Each window starts with BOS when the tokenizer adds one, as
    the model saw in training. Too little text for one window is a UserError naming the file.
    """
    if seq_len < 2:
        raise UserError(f"--seq-len: expected at least 2 tokens, got {seq_len}")
    if n is not None and n < 1:
        raise UserError(f"--samples: expected at least 1, got {n}")
    ids = tokenizer.encode(read_text(path, field), add_special_tokens=False)
    ids = ids[int(len(ids) * start_fraction):]
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    body = seq_len - len(bos)
    available = len(ids) // body
    if available == 0:
        raise UserError(f"{path}: {len(ids)} tokens, fewer than one window of {seq_len}")
    if n is not None and n > available:
        raise UserError(f"{path}: {len(ids)} tokens hold only {available} windows of {seq_len}, asked for {n}")
    n = available if n is None else n
    return torch.tensor([bos + ids[i * body:(i + 1) * body] for i in range(n)], dtype=torch.long)
