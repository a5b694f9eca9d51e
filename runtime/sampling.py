"""Next-token choice from logits: greedy, temperature, top-k, top-p (nucleus), seeded."""

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V]. Returns [B] int64 token ids. temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0 and not top_k:
        ids, weights, covered = nucleus_topk(logits, top_p)
        if bool(covered.all()):
            return ids.gather(-1, torch.multinomial(weights, 1, generator=generator))[:, 0]
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


TOP_CANDIDATES = 1024  # tokens the nucleus is looked for among first (the full sort only when needed)


def nucleus_topk(scaled: torch.Tensor, top_p: float, k: int = TOP_CANDIDATES):
    """The nucleus (the smallest prefix of the tokens by probability whose mass reaches ``top_p``) found
    among the top ``k`` only: sorting a 49k vocabulary for every row costs more than SmolLM2's decode step
    on CPU; ``topk`` does not. scaled: [B, V] float logits / temperature -> (ids [B, k], weights [B, k]
    (the kept tokens' probabilities, 0 elsewhere), covered [B] bool: the nucleus lies in the top k, so
    sampling ``ids`` by ``weights`` is exactly the full nucleus distribution)."""
    vals, ids = torch.topk(scaled, min(k, scaled.shape[-1]), dim=-1)
    probs = (vals - torch.logsumexp(scaled, -1, keepdim=True)).exp()
    keep = probs.cumsum(-1) - probs < top_p  # the mass of the tokens ranked above each one
    covered = ~keep[:, -1] | (vals.shape[-1] == scaled.shape[-1])
    return ids, probs * keep, covered
