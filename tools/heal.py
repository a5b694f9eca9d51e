"""``python -m tools.heal``: heal a layer-dropped model by distillation from the full model.

    python -m tools.heal --plan plans/kl-attn10.json --out ~/.cache/sublayer/healed/kl-attn10-all \\
        --self-generate 1024 --train all --steps 300 --seq-len 256 --batch-size 4 --grad-accum 2 --lr 1e-4

Teacher: the full model. Student: the same checkpoint with the plan's sublayers removed
(``tools.distill``). Loss: KL(teacher || student) of the next-token distributions at ``--temperature``
(times T^2), plus ``--mse-weight`` x the MSE of the residual stream after each layer that lost a
sublayer (Puzzle's blockwise distillation). AdamW, linear warm-up then cosine decay, gradient
accumulation and clipping, seeded data order; bf16 autocast on CPU (``--autocast``).

Training text: the full model's own generations from ``tools/heal_prompts.txt`` (``--self-generate N``,
cached by ``tools.heal_data``) and/or ``--train-text`` files (plain text or JSONL); a file that is one
of the evaluation data sets (``tools/eval_data.sha256``) is refused. Every ``--eval-every`` steps the
held-out KL against the full model is measured on ``--eval-samples`` windows of ``--eval-text`` (default:
the first half of WikiText-2 test, which may calibrate but is never trained on).

Checkpoints ``OUT/.ckpt/step-N`` (trainable tensors, optimizer state, progress; each written atomically)
every ``--save-every`` steps and at the end; ``--resume`` continues from the last one. The result is
``OUT`` itself: a checkpoint directory with only the kept tensors and the plan in its config
(``tools.export.write_checkpoint``), which ``runtime.load`` / ``runtime.generate`` / the lm-eval adapter
load without ``--plan``.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from model.errors import UserError, cli_main
from tools import distill
from tools.calib import WIKITEXT2, read_text

TRAIN = ("norms", "lora", "all")


def lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def training_windows(args, checkpoint, tokenizer) -> tuple[torch.Tensor, list[str]]:
    """[N, seq_len] training windows and a description of where they came from."""
    from tools.heal_data import check_training_file, self_generate, token_stream_windows

    sequences, where = [], []
    for path in args.train_text or []:
        check_training_file(path)
        sequences.append(tokenizer.encode(read_text(path), add_special_tokens=False))
        where.append(f"file {Path(path).name}")
    if args.self_generate:
        ids = self_generate(checkpoint, args.self_generate, args.prompts)
        sequences.extend(ids)
        where.append(f"{len(ids)} self-generated samples ({sum(map(len, ids))} tokens)")
    if not sequences:
        raise UserError("no training text: give --self-generate N and/or --train-text FILE")
    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    return token_stream_windows(sequences, args.seq_len, eos), where


def rows_for(step: int, micro: int, batch: int, accum: int, n: int, seed: int) -> torch.Tensor:
    """Window indices of micro-batch ``micro`` of optimizer step ``step``: a fresh seeded permutation
    of the N windows per epoch, so the order depends only on (seed, step) and resumes exactly."""
    start = (step * accum + micro) * batch
    out = []
    for k in range(start, start + batch):
        epoch, pos = divmod(k, n)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[pos]))
    return torch.tensor(out)


class Healer:
    """Teacher, student, optimizer, and the loss of one batch [B, T]."""

    def __init__(self, checkpoint, plan, train: str, rank: int, lr: float, temperature: float, mse_weight: float,
                 autocast: bool):
        self.plan, self.temperature, self.mse_weight, self.autocast = plan, temperature, mse_weight, autocast
        self.teacher = distill.load_hf(checkpoint).eval().requires_grad_(False)
        student = distill.remove_sublayers(distill.load_hf(checkpoint), plan)
        self.student = distill.set_trainable(student, train, rank)
        self.params = {n: p for n, p in self.student.named_parameters() if p.requires_grad}
        if not self.params:
            raise UserError(f"--train {train}: nothing to train in this model")
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=0.0)
        self.boundaries = distill.boundary_layers(plan)

    def _ctx(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        hidden = self.mse_weight > 0
        with torch.no_grad(), self._ctx():
            t = self.teacher(batch, output_hidden_states=hidden)
        with self._ctx():
            s = self.student(input_ids=batch, output_hidden_states=hidden)
        loss = distill.kl_loss(s.logits, t.logits, self.temperature)
        if hidden:
            mse = sum(torch.nn.functional.mse_loss(s.hidden_states[i].float(), t.hidden_states[i].float())
                      for i in self.boundaries) / len(self.boundaries)
            loss = loss + self.mse_weight * mse
        return loss

    @torch.no_grad()
    def held_out_kl(self, windows: torch.Tensor, batch_size: int = 4) -> float:
        """KL(teacher || student) per token (temperature 1, float32), mean over ``windows`` [N, T]."""
        self.student.eval()
        total = 0.0
        for b in windows.split(batch_size):
            total += distill.kl_loss(self.student(input_ids=b).logits, self.teacher(b).logits).item() * len(b)
        self.student.train()
        return total / len(windows)


# ---- checkpoints -------------------------------------------------------------------------------
def _ckpt_dir(out: Path) -> Path:
    return out / ".ckpt"


def last_checkpoint(out: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in _ckpt_dir(out).glob("step-*")
             if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / "state.json").is_file()]
    return max(steps)[1] if steps else None


def save_checkpoint(out: Path, healer: Healer, state: dict, keep: int = 2):
    """OUT/.ckpt/step-N: trainable tensors, AdamW moments (safetensors) and state.json, atomically."""
    from safetensors.torch import save_file

    from model.atomic import install_dir

    target = _ckpt_dir(out) / f"step-{state['step']}"
    with install_dir(target, replace=True) as tmp:
        save_file({n: p.detach().contiguous() for n, p in healer.params.items()}, str(tmp / "trainable.safetensors"))
        opt = {}
        for i, (name, p) in enumerate(healer.params.items()):
            s = healer.opt.state.get(p)
            if s:
                opt[f"{name}.exp_avg"], opt[f"{name}.exp_avg_sq"] = s["exp_avg"], s["exp_avg_sq"]
                opt[f"{name}.step"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1)
        save_file({k: v.contiguous() for k, v in opt.items()}, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    older = sorted((int(p.name.split("-")[1]), p) for p in _ckpt_dir(out).glob("step-*") if p != target)
    for _, p in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, healer: Healer) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    if set(tensors) != set(healer.params):
        raise UserError(f"{path}: its trainable tensors do not match this run's --train/--rank/--plan; "
                        f"resume with the same settings or use another --out")
    with torch.no_grad():
        for n, p in healer.params.items():
            p.copy_(tensors[n])
    opt = load_file(str(path / "optimizer.safetensors"))
    for n, p in healer.params.items():
        if f"{n}.exp_avg" in opt:
            healer.opt.state[p] = {"step": opt[f"{n}.step"][0].clone(), "exp_avg": opt[f"{n}.exp_avg"],
                                   "exp_avg_sq": opt[f"{n}.exp_avg_sq"]}
    return json.loads((path / "state.json").read_text())


def write_result(out: Path, healer: Healer, checkpoint: Path, plan, source: dict):
    """The healed model as a checkpoint directory at ``out`` (kept tensors only, plan in the config):
    written beside the training state, then its files moved into ``out`` with config.json last, so
    ``out`` is loadable only once complete."""
    from safetensors import safe_open

    from tools.export import write_checkpoint

    with safe_open(str(next(checkpoint.glob("*.safetensors"))), "pt") as f:
        names = set(f.keys())
    for index in checkpoint.glob("*.safetensors.index.json"):
        names |= set(json.loads(index.read_text())["weight_map"])
    state = distill.merged_state(healer.student)
    kept = {k: v for k, v in state.items() if k in names}
    staging = _ckpt_dir(out) / "result"
    if staging.exists():
        shutil.rmtree(staging)
    with open(os.devnull, "w") as quiet:  # the export's serving notes are not news here
        write_checkpoint(kept, checkpoint, plan, staging, extra_source=source, progress=False, log=quiet)
    files = sorted(p.name for p in staging.iterdir())
    for name in sorted(files, key=lambda n: n == "config.json"):
        os.replace(staging / name, out / name)
    staging.rmdir()


# ---- the run -----------------------------------------------------------------------------------
def heal(args, log=sys.stderr) -> dict:
    from model.config import load_config
    from model.default_model import resolve_model
    from model.tokenizer import Tokenizer
    from runtime.plan import load_plan
    from tools.search_plan import calibration_windows

    torch.manual_seed(args.seed)
    checkpoint = resolve_model(args.model)
    config = load_config(checkpoint)
    if config.carried_plan is not None:
        raise UserError(f"--model {checkpoint}: already a dropped checkpoint; heal from the full model with --plan")
    plan = load_plan(args.plan, config.num_layers)
    if not plan.drop_attention and not plan.drop_mlp:
        raise UserError(f"--plan {plan.name!r} drops nothing: there is nothing to heal")
    out = Path(args.out).expanduser()
    from model.atomic import check_out_path

    check_out_path(out, [checkpoint] + [p for p in [args.plan] if p and Path(p).exists()] + (args.train_text or []))
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise UserError(f"--out {out}: already exists; pass --resume to continue its run, or choose another --out")
    if args.train not in TRAIN:
        raise UserError(f"--train: expected one of {', '.join(TRAIN)}, got {args.train!r}")
    for flag in ("steps", "seq_len", "batch_size", "grad_accum", "eval_every", "save_every", "eval_samples"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}")
    tokenizer = Tokenizer(checkpoint, config.bos_token_id, config.eos_token_ids)
    windows, where = training_windows(args, checkpoint, tokenizer)
    if args.eval_start_fraction == 0:
        held_out = calibration_windows(tokenizer, args.eval_text, args.eval_samples, args.seq_len)
    else:
        from tools.calib import token_windows

        held_out = token_windows(tokenizer, args.eval_text, args.seq_len, args.eval_samples, args.eval_start_fraction)
    healer = Healer(checkpoint, plan, args.train, args.rank, args.lr, args.temperature, args.mse_weight, args.autocast)
    out.mkdir(parents=True, exist_ok=True)
    state = {"step": 0, "tokens": 0, "history": [], "train_s": 0.0}
    resumed = last_checkpoint(out) if args.resume else None
    if resumed is not None:
        state = load_checkpoint(resumed, healer)
        print(f"resumed: {resumed} (step {state['step']})", file=log)
    print(f"plan: {plan.describe()}", file=log)
    print(f"training text: {', '.join(where)}: {len(windows)} windows of {args.seq_len} tokens", file=log)
    print(f"trainable: {sum(p.numel() for p in healer.params.values()) / 1e6:.2f} M parameters ({args.train})", file=log)
    if not state["history"]:
        state["history"].append({"step": 0, "tokens": 0, "held_out_kl": healer.held_out_kl(held_out)})
        print(f"held-out KL at step 0: {state['history'][-1]['held_out_kl']:.4f}", file=log)
    warmup = max(1, int(args.warmup * args.steps))
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    bar = tqdm(total=args.steps, initial=state["step"], desc="heal", unit="step", file=sys.stderr,
               disable=not args.progress)
    healer.student.train()
    t_run, tok_run = time.perf_counter(), 0
    while state["step"] < args.steps:
        step = state["step"]
        lr = lr_at(step, args.steps, warmup, args.lr)
        for g in healer.opt.param_groups:
            g["lr"] = lr
        healer.opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(args.grad_accum):
            batch = windows[rows_for(step, micro, args.batch_size, args.grad_accum, len(windows), args.seed)]
            loss = healer.loss(batch) / args.grad_accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(list(healer.params.values()), args.clip)
        healer.opt.step()
        state["step"] += 1
        state["tokens"] += tokens_per_step
        tok_run += tokens_per_step
        elapsed = time.perf_counter() - t_run
        state.setdefault("losses", []).append(round(total, 5))
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", tokens_per_s=f"{tok_run / elapsed:.0f}")
        done = state["step"] == args.steps
        if state["step"] % args.eval_every == 0 or done:
            kl = healer.held_out_kl(held_out)
            state["history"].append({"step": state["step"], "tokens": state["tokens"], "held_out_kl": kl,
                                     "train_loss": total})
            tqdm.write(f"step {state['step']}: train loss {total:.4f}, held-out KL {kl:.4f}, "
                       f"{state['tokens']} tokens", file=log)
        if state["step"] % args.save_every == 0 or done:
            state["train_s"] = round(state.get("train_s", 0.0) + time.perf_counter() - t_run, 1)
            t_run, tok_run = time.perf_counter(), 0
            save_checkpoint(out, healer, state)
        if args.stop_after and state["step"] >= args.stop_after and not done:
            bar.close()
            print(f"stopped after step {state['step']} (--stop-after); continue with --resume", file=log)
            return state
    bar.close()
    source = {"tool": "tools.heal", "train": args.train, "rank": args.rank if args.train == "lora" else None,
              "steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size,
              "grad_accum": args.grad_accum, "lr": args.lr, "temperature": args.temperature,
              "mse_weight": args.mse_weight, "seed": args.seed, "tokens": state["tokens"],
              "training_text": where, "held_out_kl": state["history"]}
    write_result(out, healer, checkpoint, plan, source)
    (out / "heal_log.json").write_text(json.dumps(dict(source, losses=state.get("losses", []),
                                                       train_s=state["train_s"]), indent=1) + "\n")
    print(f"healed checkpoint: {out} ({state['tokens']} training tokens, {state['train_s']} s)", file=log)
    return state


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.heal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the full checkpoint (teacher); default: SmolLM2")
    p.add_argument("--plan", required=True, help="what the student drops: a plan file or preset name")
    p.add_argument("--out", required=True, help="the healed checkpoint directory to write")
    p.add_argument("--self-generate", type=int, default=0, metavar="N", help="train on N cached self-generations")
    p.add_argument("--prompts", default=str(Path(__file__).resolve().parent / "heal_prompts.txt"))
    p.add_argument("--train-text", action="append", metavar="FILE", help="plain text or JSONL (repeatable)")
    p.add_argument("--train", default="all", help="norms | lora | all")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (--train lora)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of --steps")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--mse-weight", type=float, default=0.0, help="weight of the residual-stream MSE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--eval-text", default=str(WIKITEXT2), help="held-out KL text (default: WikiText-2 test, first half)")
    p.add_argument("--eval-start-fraction", type=float, default=0.0)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--no-autocast", dest="autocast", action="store_false", help="train in float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a killed run
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


@cli_main
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    heal(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
