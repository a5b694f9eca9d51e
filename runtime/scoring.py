"""Scoring continuations on the eager path, with their shared prefixes run once into a KV cache.

A *group* is a prefix (token ids already in the cache) and rows of (inputs, targets) fed after it:
the log-probabilities of ``targets`` given prefix + inputs are summed, and a row is *greedy* when
every target is the argmax. Groups of a batch are left-padded so that every prefix ends at the same
cache index; each row's continuation then runs on its own cache row (``KVCache.copy_rows``), and a
prefix common to the whole batch, or to the previous batch, runs once (``KVCache.copy_prefix``).

    engine.score([1, 450, 4996], [[17354], [4796, 1701]])   # [(logprob, is_greedy), ...]
"""

import math

import torch
import torch.nn.functional as F

from model.errors import UserError

# upper bound on one forward's float32 logits (rows x positions x vocab): long rows are scored in chunks
LOGITS_BUDGET = 2 ** 28  # bytes
# a forward costs about as much as this many more token positions (it reads every weight once): the price
# of cutting a batch's continuations into sub-batches of similar length
FORWARD_COST_TOKENS = 32


def common_prefix_len(seqs) -> int:
    """Length of the longest common prefix of the sequences."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def partition(lengths: list[int]) -> list[range]:
    """Cut rows sorted by length (longest first) into consecutive sub-batches minimising
    sum(rows x longest + FORWARD_COST_TOKENS) over the sub-batches (padded positions plus a forward's cost)."""
    n = len(lengths)
    best = [0.0] + [math.inf] * n  # best[i]: cost of rows[:i]
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(i):  # last sub-batch rows[j:i], its longest row is rows[j]
            c = best[j] + (i - j) * lengths[j] + FORWARD_COST_TOKENS
            if c < best[i]:
                best[i], cut[i] = c, j
    parts, i = [], n
    while i > 0:
        parts.append(range(cut[i], i))
        i = cut[i]
    return parts[::-1]


class Scorer:
    """Scores batches of groups on one engine, remembering the last common prefix's KV cache so that a
    preamble shared across batches (few-shot examples) runs once."""

    def __init__(self, engine):
        self.engine = engine
        self._memo = None  # (tokens, batch-1 KV cache) of the last common prefix

    @torch.inference_mode()
    def _run(self, tokens, cache, start, kv_start, positions, score=None):
        """Feed tokens [B, T] at cache indices start.. in chunks that keep the logits small.
        score: None (fill the cache only) or (targets [B, T], valid [B, T]) -> (logprob sums [B], all greedy [B])."""
        e = self.engine
        B, T = tokens.shape
        V = e.config.vocab_size
        # filling the cache: chunks of 2048 tokens; scoring: as many positions as the logits budget allows
        chunk = max(1, min(T, 2048 if score is None else LOGITS_BUDGET // (4 * B * V)))
        total = torch.zeros(B, dtype=torch.float64)
        greedy = torch.ones(B, dtype=torch.bool)
        for a in range(0, T, chunk):
            b = min(T, a + chunk)
            out = e.forward(tokens[:, a:b], cache, start + a, kv_start, positions[:, a:b], last_only=score is None)
            if score is None:
                continue
            targets, valid = score[0][:, a:b], score[1][:, a:b]
            logp = F.log_softmax(out.float(), dim=-1)
            picked = torch.gather(logp, 2, targets.unsqueeze(-1)).squeeze(-1)
            total += torch.where(valid, picked, 0.0).double().sum(1).cpu()
            hit = (logp.argmax(-1) == targets) | ~valid
            greedy &= hit.all(1).cpu()
        return total, greedy

    def _common_kv(self, tokens: tuple):
        """A batch-1 KV cache holding ``tokens`` at positions 0..len-1, reusing the previous call's cache
        for the longest prefix the two share (a position's keys and values depend only on the tokens up
        to it)."""
        e = self.engine
        memo_tokens, memo = self._memo if self._memo is not None else ((), None)
        k = common_prefix_len([memo_tokens, tokens])
        if memo is not None and k == len(tokens):
            return memo
        cache = e.new_cache(1, len(tokens))
        if k > 0:
            cache.copy_prefix(memo, k)
        dev = e.device
        rest = torch.tensor([tokens[k:]], dtype=torch.long, device=dev)
        self._run(rest, cache, k, torch.zeros(1, dtype=torch.int32, device=dev),
                  torch.arange(k, len(tokens), device=dev)[None])
        self._memo = (tokens, cache)
        return cache

    def score_batch(self, groups) -> list[list[tuple[float, bool]]]:
        """groups: [(prefix ids, [(input ids, target ids), ...])], inputs and targets of equal, non-zero
        length. Returns per group, per row, (sum of the targets' log-probabilities, all greedy)."""
        e = self.engine
        dev = e.device
        prefixes = [tuple(prefix) for prefix, _ in groups]
        P = max(len(p) for p in prefixes)
        # contexts are left-padded so that each ends at cache index P
        kv_start_g = torch.tensor([P - len(p) for p in prefixes], dtype=torch.int32, device=dev)
        cache = e.new_cache(len(groups), max(P, 1))
        L = common_prefix_len(prefixes)
        C = P - L  # cache indices P-C..P-1 run per row; before them, rows copy the common prefix's KV
        if L > 0:
            common = self._common_kv(prefixes[0][:L])
            for g, p in enumerate(prefixes):
                if len(p) - C > 0:
                    cache.copy_prefix(common, len(p) - C, rows=slice(g, g + 1), at=P - len(p))
        if C > 0:
            toks = torch.zeros((len(groups), C), dtype=torch.long)
            for g, p in enumerate(prefixes):
                seg = p[-C:]
                if seg:
                    toks[g, C - len(seg):] = torch.tensor(seg)
            pos = (torch.arange(P - C, P, device=dev)[None] - kv_start_g[:, None]).clamp(min=0)
            self._run(toks.to(dev), cache, P - C, kv_start_g, pos)
        # every row, longest first, cut into sub-batches so as to trade right padding against forwards
        rows = [(g, r, inp, tgt) for g, (_, members) in enumerate(groups) for r, (inp, tgt) in enumerate(members)]
        out = [[None] * len(members) for _, members in groups]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][2]))
        for sub in partition([len(rows[i][2]) for i in order]):
            picked = [rows[order[j]] for j in sub]
            scores = self._score_rows(picked, cache, kv_start_g, P)
            for (g, r, _, _), s in zip(picked, scores):
                out[g][r] = s
        return out

    def _score_rows(self, rows, cache, kv_start_g, P):
        """Score ``rows`` [(group, row, inputs, targets)] on top of their groups' contexts in ``cache``."""
        e = self.engine
        dev = e.device
        R, S = len(rows), max(len(r[2]) for r in rows)
        idx = torch.tensor([g for g, _, _, _ in rows], device=dev)
        cache_r = e.new_cache(R, P + S)  # one cache row per continuation
        if P > 0:
            cache_r.copy_rows(cache, idx, P)
        kv_start = kv_start_g.index_select(0, idx)
        toks = torch.zeros((R, S), dtype=torch.long)
        targets = torch.zeros((R, S), dtype=torch.long)
        valid = torch.zeros((R, S), dtype=torch.bool)
        for r, (_, _, inp, tgt) in enumerate(rows):
            toks[r, :len(inp)] = torch.tensor(inp)
            targets[r, :len(tgt)] = torch.tensor(tgt)
            valid[r, :len(tgt)] = True
        pos = (P - kv_start)[:, None].long() + torch.arange(S, device=dev)[None]
        pos = pos.clamp(max=e.config.max_position_embeddings - 1)  # only right padding can run past the end
        total, greedy = self._run(toks.to(dev), cache_r, P, kv_start, pos, (targets.to(dev), valid.to(dev)))
        return [(float(total[r]), bool(greedy[r])) for r in range(R)]


def score(engine, prefix_ids, continuations) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, is greedy) of each continuation (a list of token ids) right after
    ``prefix_ids``; the prefix runs once."""
    prefix = list(prefix_ids)
    conts = [list(c) for c in continuations]
    if not prefix or not conts or any(not c for c in conts):
        raise UserError("score: expected a non-empty prefix and non-empty continuations")
    engine.check_token_ids([prefix, *conts], "score token ids")
    engine.check_length(len(prefix) + max(map(len, conts)) - 1, "a prefix plus its longest continuation")
    rows = [([prefix[-1]] + c[:-1], c) for c in conts]
    return Scorer(engine).score_batch([(prefix[:-1], rows)])[0]
