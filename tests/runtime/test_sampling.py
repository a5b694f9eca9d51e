import pytest
import torch

from runtime.sampling import nucleus_topk, sample


@pytest.mark.parametrize("temperature, top_p, k", [(0.7, 0.95, 64), (1.0, 0.9, 64), (1.0, 0.999, 8)])
def test_nucleus_topk_is_samples_nucleus(temperature, top_p, k):
    torch.manual_seed(0)
    logits = torch.randn(6, 500) * torch.tensor([[0.5], [1], [2], [4], [8], [16]])  # flat to peaked rows
    ids, weights, covered = nucleus_topk(logits / temperature, top_p, k)
    # reference: runtime.sampling.sample's rule over the fully sorted vocabulary
    sorted_logits, order = torch.sort(logits / temperature, descending=True, dim=-1)
    p = sorted_logits.softmax(-1)
    keep = p.cumsum(-1) - p < top_p
    for b in range(len(logits)):
        ref = {int(order[b, j]): float(p[b, j]) for j in range(logits.shape[1]) if keep[b, j]}
        assert bool(covered[b]) == (len(ref) < k or (len(ref) == k and keep[b, :k].all() and not keep[b, k]))
        if covered[b]:
            got = {int(i): float(w) for i, w in zip(ids[b], weights[b]) if w > 0}
            assert got.keys() == ref.keys()
            for t in ref:
                assert got[t] == pytest.approx(ref[t], rel=1e-5)
    assert covered.any() and not covered.all()  # both paths are exercised


def test_sample_top_p_draws_from_the_nucleus():
    """sample() with top_p (its fast top-k path): only nucleus tokens, at the nucleus' probabilities."""
    torch.manual_seed(0)
    logits = torch.randn(1, 5000) * 4
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    p = sorted_logits.softmax(-1)
    keep = p.cumsum(-1) - p < 0.9
    ref = {int(order[0, j]): float(p[0, j] / p[0][keep[0]].sum()) for j in range(5000) if keep[0, j]}
    assert len(ref) < 1024  # the fast path applies
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sample(logits, 1.0, 0, 0.9, g) for _ in range(4000)])[:, 0]
    counts = torch.bincount(draws, minlength=5000).float() / len(draws)
    assert set(draws.tolist()) <= ref.keys()
    for t, q in ref.items():
        assert abs(float(counts[t]) - q) < 0.03
