"""Export a plan-dropped model in a format other engines serve: ``python -m tools.export``.

    python -m tools.export --model DIR|name --plan PLAN --format nemotron-nas|llm-drop --out DIR2 \\
        [--force] [--shard-size 2GB]

Writes only the kept tensors (safetensors, sharded with ``model.safetensors.index.json`` past
--shard-size), the config in that format with the plan recorded, the tokenizer files and a README.md
on serving it. Everything is written to a temporary directory next to DIR2 and renamed at the end.

* ``nemotron-nas``: ``DeciLMForCausalLM`` config with one ``block_configs`` entry per layer (no-op
  sublayers have no tensors). ``model_type`` "nemotron-nas" is known to neither transformers nor
  vLLM's own config registry, so a small ``configuration_decilm.py`` (``auto_map``) is written too and
  vLLM needs ``--trust-remote-code``.
* ``llm-drop``: the Llama config plus ``drop_attn_list`` / ``drop_mlp_list`` (layer indices), as
  CASE-Lab-UMD/LLM-Drop's ``configuration_dropped_llama`` reads them. Their
  ``modeling_dropped_llama`` builds no module for a dropped sublayer, so only kept tensors are written.
"""

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

from model.errors import UserError, read_json
from model.formats import (DECILM_ARCH, NEMOTRON_NAS, PLAN_KEY, ffn_mult_to_intermediate_size,
                           intermediate_size_to_ffn_mult)

FORMATS = ("nemotron-nas", "llm-drop")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
_DROP_KEYS = ("block_configs", "auto_map", "drop_attn_list", "drop_mlp_list", PLAN_KEY)


def parse_size(text) -> int:
    """'2GB', '500MB', '1.5GiB' or a plain number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise UserError(f"--shard-size: expected a size such as 2GB, 500MB or 1GiB, got {text!r}")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise UserError(f"--shard-size: must be positive, got {text!r}")
    return n


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


# A minimal config class for `--trust-remote-code` (our own code, written next to config.json).
CONFIGURATION_DECILM = '''"""DeciLM / Nemotron-NAS config for a checkpoint exported by sublayer (tools.export).

Only what loading the config needs: ``block_configs`` entries become objects with attribute access
(``block.attention.no_op``, ``block.ffn.ffn_mult``, ...) holding exactly the keys written in
config.json, so ``hasattr(block.ffn, "ffn_mult")`` is false where only ``intermediate_size`` is given.
"""

from transformers import PretrainedConfig


class _Fields(dict):
    """A JSON object with attribute access; still a dict, so the config serialises unchanged."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _block(block):
    return _Fields(attention=_Fields(block["attention"]), ffn=_Fields(block["ffn"]))


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [_block(b) for b in (block_configs or [])]
        super().__init__(**kwargs)
'''


def _exported_config(fmt: str, raw: dict, config, plan, where_plan: dict) -> tuple[dict, list[str]]:
    """The config.json to write, and notes for stderr."""
    notes = []
    base = {k: v for k, v in raw.items() if k not in _DROP_KEYS}
    L = config.num_layers
    if fmt == "llm-drop":
        base["drop_attn_list"] = sorted(plan.drop_attention)
        base["drop_mlp_list"] = sorted(plan.drop_mlp)
        base[PLAN_KEY] = where_plan
        return base, notes
    # nemotron-nas
    if not plan.kept_attention:
        raise UserError("--format nemotron-nas: the plan drops every attention sublayer; vLLM takes the number of KV "
                        "heads from the first kept attention block (NemotronNasModelArchConfigConvertor) and fails")
    first_kept = next(("attention" if l not in plan.drop_attention else "mlp")
                      for l in range(L) if l not in plan.drop_attention or l not in plan.drop_mlp)
    if first_kept == "mlp":
        layer = next(l for l in range(L) if l not in plan.drop_attention or l not in plan.drop_mlp)
        raise UserError(f"--format nemotron-nas: the first kept sublayer is layer {layer}'s MLP (attention dropped "
                        f"before it); vLLM's DeciLMDecoderLayer.forward only starts the residual stream in a kept "
                        f"attention, so its MLP would get residual=None and the model would fail or be wrong. "
                        f"Keep layer {layer}'s attention, drop its whole block, or use --format llm-drop")
    H, heads = config.hidden_size, config.num_heads
    mult = intermediate_size_to_ffn_mult(config.intermediate_size, H)
    if mult is None and plan.kept_mlp:
        notes.append(f"note: intermediate size {config.intermediate_size} is not round_up(int(2 * ffn_mult * {H} / 3), "
                     f"256) for any ffn_mult; writing the explicit 'ffn.intermediate_size' instead (no 'ffn_mult'). "
                     f"vLLM's nemotron_nas.py reads it only when the ffn config has no ffn_mult attribute, which holds "
                     f"with the configuration_decilm.py written here, but not with NVIDIA's DeciLM config code")
    blocks = []
    for layer in range(L):
        if layer in plan.drop_attention:
            attn = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
        else:
            attn = {"no_op": False, "replace_with_linear": False, "n_heads_in_group": heads // config.num_kv_heads}
        if layer in plan.drop_mlp:
            ffn = {"no_op": True, "replace_with_linear": False, "ffn_mult": None}
        elif mult is not None:
            ffn = {"no_op": False, "replace_with_linear": False, "ffn_mult": mult}
        else:
            ffn = {"no_op": False, "replace_with_linear": False, "intermediate_size": config.intermediate_size}
        blocks.append({"attention": attn, "ffn": ffn})
    if mult is not None:
        assert ffn_mult_to_intermediate_size(mult, H) == config.intermediate_size
    base.update({
        "architectures": [DECILM_ARCH], "model_type": NEMOTRON_NAS,
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig"},
        "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": heads, "head_dim": config.head_dim,
        "num_key_value_heads": None, "intermediate_size": None, "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_theta": config.rope_theta,
                            **(config.rope_scaling or {"rope_type": "default"})},
        "block_configs": blocks, PLAN_KEY: where_plan,
    })
    base.pop("rope_scaling", None)
    if config.rope_scaling:
        base["rope_scaling"] = config.rope_scaling
    return base, notes


def _readme(fmt: str, out_name: str, plan, written: int, full: int, notes: list[str]) -> str:
    head = (f"# {out_name}\n\nExported by sublayer (`python -m tools.export --format {fmt}`) with plan "
            f"`{plan.name}`: {plan.describe()}.\nWeights: {_mib(written)} written of the full checkpoint's "
            f"{_mib(full)}; only the kept sublayers' tensors are stored.\n\n")
    if fmt == "nemotron-nas":
        body = f"""## Serve with vLLM

```bash
vllm serve {out_name} --trust-remote-code --tensor-parallel-size N
```

`--trust-remote-code` is needed because `model_type` "nemotron-nas" is in neither transformers' nor
vLLM's config registry: the config class comes from `configuration_decilm.py` here (named in
`auto_map`). It only turns `block_configs` into attribute objects; the model code is vLLM's own
`DeciLMForCausalLM` (`vllm/model_executor/models/nemotron_nas.py`). N must divide the number of
attention heads and the KV heads (or be a multiple of them).

Each layer's `block_configs` entry says whether its attention / FFN is a no-op (no tensors, norm
included). Kept FFN width = `round_up(int(2 * ffn_mult * hidden_size / 3), 256)` (or an explicit
`ffn.intermediate_size` where no `ffn_mult` reproduces it).

sublayer loads this directory directly: `python -m runtime.generate --model {out_name}` (no `--plan`).

## Not tested

vLLM could not be run where this was exported: nothing here was served by vLLM. Checked: the
config against the fields `nemotron_nas.py` reads, the tensor names/shapes against what its
`load_weights` expects, and that sublayer's own loader gives bit-identical logits to the original
model under the plan.
"""
    else:
        body = f"""## Load with LLM-Drop (Hugging Face)

`config.json` is the normal Llama config plus `drop_attn_list` / `drop_mlp_list` (layer indices),
as CASE-Lab-UMD/LLM-Drop reads them. Copy their `configuration_dropped_llama.py` and
`modeling_dropped_llama.py` (from `src/llmtuner/compression/prune/models/`) here and add

```json
"auto_map": {{"AutoConfig": "configuration_dropped_llama.LlamaConfig",
             "AutoModelForCausalLM": "modeling_dropped_llama.LlamaForCausalLM"}}
```

then `AutoModelForCausalLM.from_pretrained("{out_name}", trust_remote_code=True)`. Their model builds
no module for a dropped sublayer, so only the kept tensors are stored here (a plain Llama loader
would miss the dropped ones: transformers initialises them randomly with a warning — do not load
this directory as a plain Llama). vLLM has no LLM-Drop model; serve the `nemotron-nas` export instead.

sublayer loads this directory directly: `python -m runtime.generate --model {out_name}` (no `--plan`).

## Not tested

LLM-Drop's own code was not run where this was exported.
"""
    if notes:
        body += "\n## Notes\n\n" + "\n".join(f"- {n.removeprefix('note: ')}" for n in notes) + "\n"
    return head + body


def _write_tensors(reader, shapes: dict, out: Path, shard_size: int, progress: bool) -> int:
    from safetensors.torch import save_file
    from tqdm import tqdm

    names = list(shapes)
    shards, cur, cur_bytes = [], [], 0
    for name in names:
        t = reader._tensor(name, shapes[name])
        n = t.numel() * t.element_size()
        if cur and cur_bytes + n > shard_size:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, t))
        cur_bytes += n
    if cur:
        shards.append(cur)
    total, weight_map = 0, {}
    bar = tqdm(total=sum(len(s) for s in shards), desc="export", unit="tensor", disable=not progress, file=sys.stderr)
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: t.contiguous() for n, t in shard}, str(out / fname), metadata={"format": "pt"})
        for n, t in shard:
            weight_map[n] = fname
            total += t.numel() * t.element_size()
        bar.update(len(shard))
    bar.close()
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return total


def export(model, plan, fmt: str, out, force: bool = False, shard_size="2GB", progress: bool = True,
           log=None) -> dict:
    """Export; returns {"written": bytes, "full": bytes, "files": [...], "notes": [...]}.
    Notes and the byte counts go to ``log`` (default: stderr)."""
    log = log or sys.stderr
    from model.config import load_config
    from model.default_model import resolve_model
    from model.weights import CheckpointReader
    from runtime.compile import compile_plan, needed_tensors
    from runtime.plan import load_plan

    if fmt not in FORMATS:
        raise UserError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if plan is None:
        raise UserError("--plan: required (a plan JSON path or a preset name)")
    limit = parse_size(shard_size)
    src = resolve_model(model, show_progress=progress)
    out = Path(out).expanduser().resolve()
    if out == src or out in src.parents:
        raise UserError(f"--out: {out} is (or contains) the source checkpoint {src}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out: {out} is not empty; pass --force to replace it")
    config = load_config(src)
    if config.carried_plan is not None:
        raise UserError(f"--model: {src} already carries a plan (a {fmt}-style export?); export from the original checkpoint")
    raw = read_json(src / "config.json")
    resolved = load_plan(plan, config.num_layers)
    schedule = compile_plan(resolved, config)
    shapes = needed_tensors(schedule.steps, config)
    full_shapes = needed_tensors(compile_plan(load_plan(None, config.num_layers), config).steps, config)
    plan_record = {"version": 1, "name": resolved.name,
                   "drop": {"attention": sorted(resolved.drop_attention), "mlp": sorted(resolved.drop_mlp)},
                   "source": {"tool": "tools.export", "format": fmt, "spec": resolved.spec}}
    new_config, notes = _exported_config(fmt, raw, config, resolved, plan_record)
    for n in notes:
        print(n, file=log)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        reader = CheckpointReader(src)
        try:
            written = _write_tensors(reader, shapes, tmp, limit, progress)
            first = next(iter(shapes))
            elem = reader._tensor(first, shapes[first]).element_size()  # checkpoints store one dtype
            full = sum(math.prod(shape) for shape in full_shapes.values()) * elem
        finally:
            reader.close()
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        if fmt == "nemotron-nas":
            (tmp / "configuration_decilm.py").write_text(CONFIGURATION_DECILM)
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
        (tmp / "README.md").write_text(_readme(fmt, out.name, resolved, written, full, notes))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"plan: {resolved.describe()}", file=log)
    print(f"weights written: {_mib(written)} ({written} bytes; full checkpoint {_mib(full)}, {full} bytes; "
          f"{100 * written / full:.1f}%)", file=log)
    print(f"wrote {out}", file=log)
    return {"written": written, "full": full, "files": sorted(p.name for p in out.iterdir()), "notes": notes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory or smollm2-135m-instruct (default)")
    p.add_argument("--plan", required=True, help="plan JSON path or preset name")
    p.add_argument("--format", required=True, help=f"one of: {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    args = p.parse_args(argv)
    try:
        export(args.model, args.plan, args.format, args.out, force=args.force, shard_size=args.shard_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
