"""The Hugging Face reference for the tests and ``python -m bench.parity``: checkpoints (the real stories260K,
random tiny Llamas saved by transformers), and a ``LlamaForCausalLM`` with the same sublayers zeroed by forward hooks
(the module still runs; its contribution to the residual stream is zero), and a step-by-step runner.
"""

import shutil
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"

# name -> (hidden, layers, heads, kv_heads, intermediate, tied); GQA ratios 1, 2, 3, 4 and odd sizes
TINY_CONFIGS = {
    "mha-untied": (48, 3, 4, 4, 100, False),
    "gqa2-tied": (64, 2, 4, 2, 96, True),
    "gqa3-odd": (72, 3, 6, 2, 123, False),
    "gqa4-tied": (128, 2, 8, 2, 200, True),
}


def make_tiny_llama(out_dir: Path, hidden, layers, heads, kv_heads, intermediate, tied, seed=0) -> Path:
    """A random LlamaForCausalLM saved with transformers (its own config layout), stories260K's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=512,
                      max_position_embeddings=256, tie_word_embeddings=tied, initializer_range=0.1,
                      bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norm weights so that a wrong norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir)
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(STORIES / f, out_dir / f)
    return out_dir


def hf_model(path, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    from model.weights import require_float

    return LlamaForCausalLM.from_pretrained(require_float(path, "the Hugging Face reference"), dtype=dtype).eval()


def skip_sublayers(hf, plan):
    """Zero the output of every dropped attention / MLP module of ``hf`` (forward hooks). Returns handles."""
    handles = []

    def zero(module, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]),) + tuple(output[1:])
        return torch.zeros_like(output)

    for i in plan.drop_attention:
        handles.append(hf.model.layers[i].self_attn.register_forward_hook(zero))
    for i in plan.drop_mlp:
        handles.append(hf.model.layers[i].mlp.register_forward_hook(zero))
    return handles


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@torch.inference_mode()
def hf_prefill_decode(hf, prompt: torch.Tensor, steps: int):
    """Greedy: HF logits of the prompt's last position and of each of ``steps`` decode steps,
    and the tokens fed. prompt: [1, T]. Returns (list of [V] logits, list of token ids)."""
    out = hf(prompt, use_cache=True)
    logits, fed = [out.logits[0, -1]], []
    cache = out.cache
    for _ in range(steps):
        nxt = logits[-1].argmax()
        fed.append(int(nxt))
        out = hf(nxt.view(1, 1), cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits[0, -1])
    return logits, fed


@torch.inference_mode()
def ours_prefill_decode(engine, prompt: torch.Tensor, fed: list[int]):
    """Our logits on the same path: prefill ``prompt`` [1, T] (``forward``), then feed ``fed`` one token
    at a time (``decode_step``, the fast path as generation runs it)."""
    T = prompt.shape[1]
    cache = engine.own_cache(1, T + len(fed))
    kv_start = torch.zeros(1, dtype=torch.int32)
    logits = [engine.forward(prompt, cache, 0, kv_start, torch.arange(T)[None])[0, -1]]
    for i, t in enumerate(fed):
        logits.append(engine.decode_step(torch.tensor([[t]]), cache, torch.tensor([T + i]), kv_start)[0, -1])
    return logits


def step_errors(engine, hf, prompt: torch.Tensor, steps: int):
    """HF's greedy prefill + ``steps`` decode steps, and ours fed the same tokens. Returns
    (relative logit error per step [prefill, decode...], HF's greedy tokens, our argmax tokens),
    the token lists being steps + 1 long."""
    ref, fed = hf_prefill_decode(hf, prompt, steps)
    ours = ours_prefill_decode(engine, prompt, fed)
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    return errs, fed + [int(ref[-1].argmax())], [int(o.argmax()) for o in ours]


def plan_parity(path, hf, plan_spec, prompt_len=64, steps=32, tol=1e-4):
    """Our engine under a plan vs ``hf`` with the same sublayers zeroed: logits on prefill and every
    decode step within ``tol`` relative error, and greedy tokens identical to HF's greedy decode."""
    import runtime

    engine = runtime.load(str(path), plan=plan_spec, dtype="float32", device="cpu")
    handles = skip_sublayers(hf, engine.plan)
    try:
        prompt = torch.randint(3, engine.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
        errs, hf_greedy, _ = step_errors(engine, hf, prompt, steps)
        assert max(errs) < tol, f"{engine.plan.name}: prefill {errs[0]:.2e}, worst decode {max(errs[1:]):.2e}"
        # greedy generation from the prompt gives the tokens HF's greedy decode chose
        ours_tokens = engine.generate(prompt.tolist(), max_new_tokens=steps + 1, stop_at_eos=False).tokens[0]
        assert ours_tokens == hf_greedy
    finally:
        for h in handles:
            h.remove()
