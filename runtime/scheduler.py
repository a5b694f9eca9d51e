"""Continuous batching: one thread owns the engine and a pool of KV rows; requests join and leave at
step boundaries.

The pool is one ``KVCache`` of ``slots`` rows x ``max_seq_len`` positions (``pool_slots``: as many rows
as ``--kv-memory`` holds at the plan's bytes per position, capped by ``--max-batch``). Each iteration of
the loop:

1. frees the rows of sequences whose client went away, admits waiting sequences into free rows;
2. prefills up to ``prefill_chunk`` prompt tokens (chunks of one or more prompts, written straight
   into their pool rows), so that a long prompt does not stall the running streams;
3. runs one ``Engine.decode_step`` over pool rows 0..r-1 (r: one past the highest decoding row; rows
   are taken lowest first), each at its own cache index, and samples each decoding row with its own
   parameters and generator.

Rows that are not decoding (free, or part-way through their prefill) keep a valid dummy state: their
index is the next position their prefill writes (0 for a free row), so the step's garbage write there
is overwritten before anything reads it, and their mask (keys 0..index) is never empty.
"""

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from model.errors import UserError
from runtime.sampling import sample


def pool_slots(engine, kv_memory: int, max_seq_len: int, max_batch: int) -> int:
    """Rows of ``max_seq_len`` positions that ``kv_memory`` bytes hold under the engine's plan, at most
    ``max_batch``. A plan keeping no attention needs no KV memory: ``max_batch`` rows."""
    row = engine.kv_bytes(max_seq_len, 1)
    slots = max_batch if row == 0 else min(max_batch, kv_memory // row)
    if slots < 1:
        raise UserError(f"--kv-memory: {kv_memory} bytes hold no sequence of {max_seq_len} positions "
                        f"(one needs {row} bytes under plan {engine.plan.name!r}); raise --kv-memory or "
                        f"lower --max-seq-len")
    return slots


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (load generators)


class QueueFull(Exception):
    """The wait queue holds ``max_queue`` sequences already."""


_ids = itertools.count()


class Sequence:
    """One prompt being served. ``emit(event)`` is called from the scheduler thread with
    ``("text", delta)`` events, then exactly one ``("done", finish_reason)`` or ``("error", message)``."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, emit):
        self.id = next(_ids)
        self.prompt_ids, self.params, self.emit = list(prompt_ids), params, emit
        self.out: list[int] = []
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already in the cache
        self.sent = 0       # characters of the new text already emitted
        self.cancelled = False
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def cancel(self):
        """The client went away: the scheduler frees the row at its next step (safe from any thread)."""
        self.cancelled = True


class RowView:
    """Rows ``start..stop-1`` of the pool as a cache of their own (views: writes land in the pool)."""

    def __init__(self, pool, start: int, stop: int):
        self.k, self.v = pool.k[:, start:stop], pool.v[:, start:stop]
        self.batch, self.max_seq_len = stop - start, pool.max_seq_len


class Scheduler:
    """Owns ``engine`` on its own thread (``start`` / ``stop``); ``submit`` from any thread."""

    def __init__(self, engine, slots: int, max_seq_len: int, max_queue: int = 64, prefill_chunk: int = 256,
                 metrics=None):
        self.engine, self.slots, self.max_seq_len = engine, slots, max_seq_len
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.metrics = metrics
        tok = engine.tokenizer
        self.pad_id = tok.pad_id
        self.eos_ids = set(tok.eos_ids)
        self.pool = engine.new_cache(slots, max_seq_len)
        self.rows: list[Sequence | None] = [None] * slots
        self.waiting: deque[Sequence] = deque()
        self.cond = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        dev = engine.device
        self.kv_start = torch.zeros(slots, dtype=torch.int32, device=dev)
        self.steps = 0  # decode steps run
        self.peak_rows = 0  # most rows in use at once

    # ---- any thread ------------------------------------------------------------------------
    def submit(self, seqs: list[Sequence]):
        """Queue ``seqs`` together, or raise ``QueueFull`` if the wait queue cannot take them all."""
        with self.cond:
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"the server is at capacity: {len(self.waiting)} request(s) waiting "
                                f"(--max-queue {self.max_queue}); retry later")
            self.waiting.extend(seqs)
            self.cond.notify()

    def counts(self) -> tuple[int, int]:
        """(sequences holding a row, sequences waiting)."""
        with self.cond:
            return sum(r is not None for r in self.rows), len(self.waiting)

    def start(self):
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="sublayer-scheduler", daemon=True)
        self.thread.start()

    def stop(self):
        """Stop the loop; sequences still queued or running get an error event."""
        with self.cond:
            self.running = False
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()
        for seq in list(self.waiting) + [r for r in self.rows if r is not None]:
            seq.emit(("error", "the server is shutting down"))
        self.waiting.clear()
        self.rows = [None] * self.slots

    def warm_up(self) -> float:
        """Compile the decode step for the batch sizes it will meet (all rows; fewer, which makes the
        batch dimension dynamic; one row, its own variant) before the first request; returns seconds.
        The cache is cut to 2 positions (a cut of 1 would specialise the dynamic length to 1)."""
        t0 = time.perf_counter()
        dev = self.engine.device
        for rows in sorted({self.slots, min(2, self.slots), 1}, reverse=True):
            with torch.inference_mode():
                self.engine.decode_step(torch.full((rows, 1), self.pad_id, dtype=torch.long, device=dev),
                                        RowView(self.pool, 0, rows),
                                        torch.full((rows,), min(1, self.max_seq_len - 1), dtype=torch.long, device=dev),
                                        self.kv_start[:rows])
        return time.perf_counter() - t0

    # ---- the scheduler thread --------------------------------------------------------------
    def _loop(self):
        while True:
            with self.cond:
                while self.running and not self.waiting and all(r is None for r in self.rows):
                    self.cond.wait()
                if not self.running:
                    return
                self._drop_cancelled()
                self._admit()
            try:
                with torch.inference_mode():
                    self._prefill()
                    self._decode()
            except Exception as e:  # a bug: fail the sequences in flight, keep serving the next ones
                import traceback
                traceback.print_exc()
                for slot, seq in enumerate(self.rows):
                    if seq is not None:
                        self._finish(seq, error=f"internal error: {type(e).__name__}: {e}")

    def _drop_cancelled(self):
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
        for seq in self.rows:
            if seq is not None and seq.cancelled:
                self._free(seq)

    def _admit(self):
        for slot in range(self.slots):
            if not self.waiting:
                break
            if self.rows[slot] is None:
                seq = self.waiting.popleft()
                seq.slot = slot
                self.rows[slot] = seq
                seq.generator = torch.Generator(device=self.engine.device)
                seq.generator.manual_seed(seq.params.seed if seq.params.seed is not None
                                          else torch.seed() & (2**63 - 1))
        self.peak_rows = max(self.peak_rows, sum(r is not None for r in self.rows))

    def _prefill(self):
        """Up to ``prefill_chunk`` prompt tokens, oldest sequences first, straight into their rows."""
        budget = self.prefill_chunk
        dev = self.engine.device
        for seq in sorted((s for s in self.rows if s is not None and s.prefilled < len(s.prompt_ids)),
                          key=lambda s: s.arrived):
            if budget <= 0:
                break
            start = seq.prefilled
            n = min(budget, len(seq.prompt_ids) - start)
            tokens = torch.tensor([seq.prompt_ids[start:start + n]], dtype=torch.long, device=dev)
            positions = torch.arange(start, start + n, device=dev)[None]
            logits = self.engine.forward(tokens, RowView(self.pool, seq.slot, seq.slot + 1), start,
                                         self.kv_start[:1], positions, last_only=True)
            seq.prefilled += n
            budget -= n
            if seq.prefilled == len(seq.prompt_ids):
                self._take(seq, self._sample([seq], logits[:, -1].float())[0])

    def _decode(self):
        """One decode step over every pool row; decoding rows take their next token."""
        active = [s for s in self.rows if s is not None and s.out and s.finish_reason is None]
        if not active:
            return
        dev = self.engine.device
        rows = max(s.slot for s in active) + 1  # the step runs over pool rows 0..rows-1 only
        tokens = [self.pad_id] * rows
        index = [0] * rows
        for slot, seq in enumerate(self.rows[:rows]):
            if seq is None:
                continue
            if seq in active:
                tokens[slot] = seq.out[-1]
                index[slot] = len(seq.prompt_ids) + len(seq.out) - 1  # where the last token is written
            else:
                index[slot] = seq.prefilled  # the next position its prefill writes
        logits = self.engine.decode_step(torch.tensor(tokens, dtype=torch.long, device=dev)[:, None],
                                         RowView(self.pool, 0, rows),
                                         torch.tensor(index, dtype=torch.long, device=dev), self.kv_start[:rows])
        self.steps += 1
        rows = torch.tensor([s.slot for s in active], device=dev)
        chosen = self._sample(active, logits[:, -1].index_select(0, rows).float())
        for seq, token in zip(active, chosen):
            self._take(seq, token)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """logits [len(seqs), V] -> one token per sequence, each with its own parameters and generator."""
        out = logits.argmax(-1)
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.temperature > 0:
                out[i] = sample(logits[i:i + 1], p.temperature, p.top_k, p.top_p, seq.generator)[0]
        return out.tolist()

    def _take(self, seq: Sequence, token: int):
        """Append ``token`` to ``seq``, stream its new text, finish it if a stop condition holds."""
        now = time.perf_counter()
        m = self.metrics
        if m is not None:
            if seq.first_token_at is None:
                m.ttft.observe(now - seq.arrived)
            else:
                m.token_latency.observe(now - seq.last_token_at)
            m.tokens.inc()
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.last_token_at = now
        seq.out.append(token)
        p = seq.params
        eos = token in self.eos_ids and not p.ignore_eos
        text = self.engine.tokenizer.decode(seq.prompt_ids + seq.out)[self._prompt_chars(seq):]
        reason = None
        if p.stop:
            hits = [i for i in (text.find(s, max(0, seq.sent - len(s))) for s in p.stop) if i >= 0]
            if hits:
                text, reason = text[:min(hits)], "stop"
        if eos:
            reason = "stop"
        elif reason is None and (len(seq.out) >= p.max_tokens
                                 or len(seq.prompt_ids) + len(seq.out) >= self.max_seq_len):
            reason = "length"
        if reason is None:  # hold back what may still become a stop string or a multi-byte character
            hold = max((len(s) - 1 for s in p.stop), default=0)
            end = len(text) - hold
            while end > seq.sent and text[end - 1] == "\ufffd":
                end -= 1
        else:
            end = len(text)
        if end > seq.sent:
            seq.emit(("text", text[seq.sent:end]))
            seq.sent = end
        if reason is not None:
            seq.finish_reason = reason
            self._finish(seq)

    def _prompt_chars(self, seq: Sequence) -> int:
        if not hasattr(seq, "_prompt_chars"):
            seq._prompt_chars = len(self.engine.tokenizer.decode(seq.prompt_ids))
        return seq._prompt_chars

    def _finish(self, seq: Sequence, error: str | None = None):
        self._free(seq)
        seq.emit(("error", error) if error else ("done", seq.finish_reason))

    def _free(self, seq: Sequence):
        with self.cond:
            if seq.slot is not None and self.rows[seq.slot] is seq:
                self.rows[seq.slot] = None
            seq.slot = None


