"""Print the parity of our logits with Hugging Face LlamaForCausalLM (same sublayers skipped by hooks).

    python -m bench.parity --plans full,attn66,plans/imp-attn10.json --prompt-len 64 --steps 32

For each model and plan: relative error ||ours - hf|| / ||hf|| of the prefill's last logits and the
worst over the decode steps, and whether greedy tokens agree. The same check the tests assert, as numbers.
"""

import argparse
from pathlib import Path

import torch

import runtime
from bench.hf_reference import STORIES, TINY_CONFIGS, hf_model, make_tiny_llama, skip_sublayers, step_errors
from runtime.plan import PlanError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=f"{STORIES},smollm2-135m-instruct,tiny")
    p.add_argument("--plans", default="full")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    import tempfile

    models = []
    for m in args.models.split(","):
        if m == "tiny":
            tmp = Path(tempfile.mkdtemp())
            models += [(f"tiny {n}", str(make_tiny_llama(tmp / n, *cfg))) for n, cfg in TINY_CONFIGS.items()]
        else:
            models.append((Path(m).name, m))
    dtype = getattr(torch, args.dtype)
    print(f"| model | plan | prefill rel err | worst decode rel err ({args.steps} steps) | greedy agree |")
    print("|---|---|---|---|---|")
    for label, m in models:
        hf = None
        for plan in args.plans.split(","):
            try:
                engine = runtime.load(m, plan=plan, dtype=args.dtype, device="cpu", show_progress=False)
            except PlanError:  # an explicit plan written for a deeper model
                continue
            hf = hf or hf_model(engine.checkpoint_dir, dtype)
            handles = skip_sublayers(hf, engine.plan)
            prompt = torch.randint(3, engine.config.vocab_size, (1, args.prompt_len),
                                   generator=torch.Generator().manual_seed(0))
            errs, hf_greedy, ours_greedy = step_errors(engine, hf, prompt, args.steps)
            agree = sum(a == b for a, b in zip(ours_greedy, hf_greedy))
            print(f"| {label} | {engine.plan.name} | {errs[0]:.2e} | {max(errs[1:]):.2e} | {agree}/{len(errs)} |",
                  flush=True)
            for h in handles:
                h.remove()


if __name__ == "__main__":
    main()
