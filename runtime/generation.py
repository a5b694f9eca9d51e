"""Generation: prefill, the decode loop, sampling, stop strings and the text of new tokens.

``generate(engine, prompts, ...)`` drives an engine (``runtime.engine.Engine``: ``forward`` for the
prefill, ``decode_step`` for every new token); the loop keeps no per-step host sync beyond the one
transfer of the new tokens (and whether each row has finished).
"""

import math
import time
from dataclasses import dataclass, field

import torch

from model.errors import UserError
from runtime.sampling import sample

MAX_SEED = 2**63 - 1


@dataclass
class Generation:
    """Result of ``generate``: new token ids and their text per prompt, and timings. ``first_step_s``
    is the first decode step alone (it compiles the step, or captures the CUDA graph, once per
    process or cache); ``decode_s`` / ``decode_steps`` are the steady-state steps after it."""

    tokens: list[list[int]]
    texts: list[str]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    finished: list[bool] = field(default_factory=list)
    first_step_s: float = 0.0


def check_sampling(max_new_tokens=0, temperature=0.0, top_k=0, top_p=1.0, seed=None):
    """UserError naming the argument (and its CLI flag) for a value outside its range."""
    def bad(name, expected, value):
        return UserError(f"--{name.replace('_', '-')}: expected {expected}, got {value!r} (argument {name})")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise bad("max_new_tokens", "an integer >= 0", max_new_tokens)
    if not is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise bad("temperature", "a finite number >= 0 (0 means greedy)", temperature)
    if not is_int(top_k) or top_k < 0:
        raise bad("top_k", "an integer >= 0 (0 means off)", top_k)
    if not is_number(top_p) or not 0 < top_p <= 1:  # also refuses nan
        raise bad("top_p", "a number in (0, 1]", top_p)
    if seed is not None and (not is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise bad("seed", f"an integer in 0..{MAX_SEED}", seed)


def new_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add: decode prompt + new ids and cut at the length of the decoded prompt
    ids (decoding the new ids alone loses SentencePiece's leading space and splits characters)."""
    return tokenizer.decode(list(prompt_ids) + list(new_ids))[len(tokenizer.decode(prompt_ids)):]


def _stop_at(text: str, stops: list[str]) -> int:
    """Index of the earliest stop sequence in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


@torch.inference_mode()
def generate(engine, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, chat: bool = False, stop_at_eos: bool = True,
             stop_sequences: list[str] | None = None, on_token=None) -> Generation:
    """Generate from text prompt(s) (str or list of str) or token ids (list of int lists).

    Rows are left-padded to a common length; each row's rotary positions start at 0 at its first real
    token. ``on_token(step, tokens)`` is called after each new token with the batch's new ids (a list;
    a finished row repeats the pad id), for streaming. A row also finishes when its text contains one
    of ``stop_sequences``; ``texts`` are then cut before the stop sequence (``tokens`` keep everything).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    tok = engine.tokenizer
    if tok is None:
        raise UserError("generate: this engine has no tokenizer (a random-weight --shape engine); it can "
                        "run forward / decode_step on token ids, not generate text")
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], str)):
        ids = engine.encode_prompts(prompts, chat)
    else:
        ids = [list(p) for p in prompts]
        engine.check_token_ids(ids, "prompt token ids")
    if not ids or any(len(p) == 0 for p in ids):
        raise UserError("prompt: empty (no tokens to start from)")
    B, T0 = len(ids), max(len(p) for p in ids)
    engine.check_length(T0 + max_new_tokens, f"a prompt of {T0} tokens plus {max_new_tokens} new tokens")
    dev = engine.device
    tokens = torch.full((B, T0), tok.pad_id, dtype=torch.long)
    for b, p in enumerate(ids):
        tokens[b, T0 - len(p):] = torch.tensor(p)
    tokens = tokens.to(dev)
    kv_start = torch.tensor([T0 - len(p) for p in ids], dtype=torch.int32, device=dev)
    positions = (torch.arange(T0, device=dev)[None] - kv_start[:, None]).clamp(min=0)
    gen = torch.Generator(device=dev)
    gen.manual_seed(0 if seed is None else seed)
    cache = engine.own_cache(B, T0 + max_new_tokens)
    eos = torch.tensor(tok.eos_ids or [-1], device=dev)
    stops = [s for s in stop_sequences or [] if s]

    out = [[] for _ in range(B)]
    done = [False] * B  # host copy of ``finished``
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    index = torch.full((B,), T0, dtype=torch.long, device=dev)  # cache index of the next token
    times = []
    t0 = time.perf_counter()
    if max_new_tokens > 0:
        logits = engine.forward(tokens, cache, 0, kv_start, positions, last_only=True)
        for step in range(max_new_tokens):
            nxt = sample(logits[:, -1].float(), temperature, top_k, top_p, gen)
            nxt = torch.where(finished, tok.pad_id, nxt)
            if stop_at_eos:
                finished = finished | torch.isin(nxt, eos)
            host = torch.cat([nxt, finished.long()]).tolist()  # the one transfer of the step
            new, fin = host[:B], host[B:]
            changed = False
            for b in range(B):
                if not done[b]:
                    out[b].append(new[b])
                    if stops and _stop_at(tok.decode(out[b][-32:]), stops) >= 0:
                        fin[b], changed = 1, True
                    done[b] = bool(fin[b])
            if changed:
                finished = torch.tensor(done, device=dev)
            if on_token is not None:
                on_token(step, new)
            now = time.perf_counter()
            times.append(now - t0)
            t0 = now
            if all(done) or step == max_new_tokens - 1:
                break
            logits = engine.decode_step(nxt[:, None], cache, index, kv_start)
            index += 1
    texts = [new_text(tok, p, o) for p, o in zip(ids, out)]
    if stops:
        texts = [t[:i] if (i := _stop_at(t, stops)) >= 0 else t for t in texts]
    prefill_s = times[0] if times else 0.0
    first = times[1] if len(times) > 1 else 0.0
    return Generation(out, texts, B * T0, prefill_s, sum(times[2:]), max(0, len(times) - 2), done, first)
