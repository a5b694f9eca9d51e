"""``python -m tools.perplexity``: token perplexity of a plan over disjoint windows of a text file.

Default data: WikiText-2 test (``../shared/data/wikitext2/wiki.test.nonempty.raw``). Use
``--start-fraction 0.5`` to score only the second half (held out from calibration on the first half).
"""

import argparse
import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.errors import UserError, cli_main
from tools.calib import WIKITEXT2, token_windows


@torch.inference_mode()
def perplexity(engine, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token negative log-likelihood) over all windows [N, T] (the first token of each
    window is context only)."""
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = windows[i:i + batch_size].to(engine.device)
        logits = engine.logits(batch)[:, :-1]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.perplexity", description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--plan", default=None)
    p.add_argument("--data", default=str(WIKITEXT2))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=None, help="how many windows (default: all)")
    p.add_argument("--start-fraction", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not 0 <= args.start_fraction < 1:
        raise UserError(f"--start-fraction: expected a number in [0, 1), got {args.start_fraction}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    import runtime

    engine = runtime.load(args.model, plan=args.plan, dtype=args.dtype, device=args.device)
    windows = token_windows(engine.tokenizer, args.data, args.seq_len, args.windows, args.start_fraction)
    ppl = perplexity(engine, windows, args.batch_size)
    print(f"plan: {engine.plan.describe()}", file=sys.stderr)
    print(f"perplexity: {ppl:.4f} ({len(windows)} windows of {args.seq_len} tokens, {args.data}, "
          f"from {args.start_fraction:.0%} of the text)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
