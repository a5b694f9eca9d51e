"""bfloat16 on a GPU (the Triton kernels) against Hugging Face: runs under plain ``pytest`` where CUDA
exists, skips without it. Not yet run anywhere: no GPU was lent to the session that wrote it."""

import pytest
import torch

import runtime
from tests.models import hf_model, rel_err
from tools.calib import WIKITEXT2, token_windows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_wikitext2_parity_on_gpu(smollm2):
    """Greedy top-1 agreement >= 99% over 512 tokens of WikiText-2, relative logit error < 2e-2."""
    engine = runtime.load(str(smollm2), dtype="bfloat16", device="cuda")
    hf = hf_model(smollm2, torch.bfloat16).cuda()
    ids = token_windows(engine.tokenizer, WIKITEXT2, 512, 1).cuda()
    ours = engine.logits(ids)[0]
    with torch.inference_mode():
        ref = hf(ids).logits[0].float()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.99 and rel_err(ours, ref) < 2e-2, (agree, rel_err(ours, ref))


def test_bf16_decode_steps_follow_prefill_on_gpu(smollm2):
    """Decode (split-K kernel) and prefill (flash kernel) give the same next-token logits."""
    engine = runtime.load(str(smollm2), dtype="bfloat16", device="cuda")
    ids = token_windows(engine.tokenizer, WIKITEXT2, 128, 1).cuda()
    full = engine.logits(ids)[0]
    cache = engine.new_cache(1, 128)
    kv0 = torch.zeros(1, dtype=torch.int32, device="cuda")
    pos = torch.arange(96, device="cuda")[None]
    engine.forward(ids[:, :96], cache, 0, kv0, pos)
    for t in range(96, 128):
        step = engine.forward(ids[:, t:t + 1], cache, t, kv0, torch.tensor([[t]], device="cuda"))[0, -1].float()
        assert rel_err(step, full[t]) < 2e-2
