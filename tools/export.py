"""Export a plan-dropped model in a format other engines serve: ``python -m tools.export``.

    python -m tools.export --model DIR|name --plan PLAN [--format auto|nemotron-nas|llm-drop] --out DIR2 \\
        [--force] [--shard-size 2GB]

Writes only the kept tensors (safetensors, sharded with ``model.safetensors.index.json`` past
--shard-size), the config in that format with the plan recorded, the tokenizer files and a README.md
on serving it, through ``model.atomic.install_dir``: a temporary directory beside DIR2, renamed in at
the end (--force: the old DIR2 is moved aside first and removed last); modes follow the umask; DIR2
may not be, contain or sit inside the checkpoint or the plan file. ``write_checkpoint`` does the
same for tensors held in memory (healing).

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
import shutil
import sys
from pathlib import Path

from model.errors import UserError, cli_main, read_json
from model.sizes import parse_size
from model.formats import (DECILM_ARCH, NEMOTRON_NAS, PLAN_KEY, ffn_mult_to_intermediate_size,
                           intermediate_size_to_ffn_mult)

FORMATS = ("nemotron-nas", "llm-drop")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
_DROP_KEYS = ("block_configs", "auto_map", "drop_attn_list", "drop_mlp_list", PLAN_KEY)


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


def nemotron_nas_obstacle(plan) -> str | None:
    """Why Nemotron-NAS (as vLLM reads it) cannot express ``plan``, or None when it can."""
    if not plan.kept_attention:
        return ("the plan drops every attention sublayer; vLLM takes the number of KV heads from the first kept "
                "attention block (NemotronNasModelArchConfigConvertor) and fails")
    L = plan.num_layers
    layer = next((l for l in range(L) if l not in plan.drop_attention or l not in plan.drop_mlp), None)
    if layer is not None and layer in plan.drop_attention:
        return (f"the first kept sublayer is layer {layer}'s MLP (attention dropped before it); vLLM's "
                f"DeciLMDecoderLayer.forward only starts the residual stream in a kept attention, so its MLP would "
                f"get residual=None and the model would fail or be wrong. Keep layer {layer}'s attention, drop its "
                f"whole block, or use --format llm-drop")
    return None


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS + ("auto",):
        raise UserError(f"--format: expected one of {', '.join(FORMATS + ('auto',))}, got {fmt!r}")


def choose_format(fmt: str, plan) -> str:
    """``fmt``, or for "auto" Nemotron-NAS unless it cannot express the plan (then LLM-Drop)."""
    _check_format(fmt)
    if fmt == "auto":
        return "llm-drop" if nemotron_nas_obstacle(plan) else "nemotron-nas"
    return fmt


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
    obstacle = nemotron_nas_obstacle(plan)
    if obstacle:
        raise UserError(f"--format nemotron-nas: {obstacle}")
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


def _write_tensors(tensors: dict, out: Path, shard_size: int, progress: bool) -> int:
    """Safetensors shards of at most ``shard_size`` bytes (an index when more than one); bytes written."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards, cur, cur_bytes = [], [], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and cur_bytes + n > shard_size:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, t))
        cur_bytes += n
    if cur:
        shards.append(cur)
    total, weight_map = 0, {}
    with tqdm(total=len(tensors), desc="export", unit="tensor", disable=not progress, file=sys.stderr) as bar:
        for k, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: t.detach().cpu().contiguous() for n, t in shard}, str(out / fname), metadata={"format": "pt"})
            for n, t in shard:
                weight_map[n] = fname
                total += t.numel() * t.element_size()
            bar.update(len(shard))
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return total


def write_checkpoint(tensors: dict, source_dir, plan, out, *, fmt: str = "auto", force: bool = False,
                     extra_source: dict | None = None, progress: bool = True, shard_size="2GB", log=None) -> dict:
    """Write a plan-dropped checkpoint directory ``out`` from in-memory ``tensors`` (name -> tensor, exactly
    the kept tensors of ``plan`` on the checkpoint ``source_dir``, any dtype/device), atomically.

    The config is ``source_dir``'s in ``fmt`` ("auto": Nemotron-NAS, or LLM-Drop where Nemotron-NAS cannot
    express the plan) with the plan recorded (``extra_source`` merged into its ``source``), plus the
    tokenizer files and a README. ``source_dir`` and a plan file are inputs: ``out`` may not touch them.
    Returns {"written": bytes, "full": bytes, "format": fmt, "files": [...], "notes": [...]}.
    """
    log = log or sys.stderr
    from model.atomic import LOCK_NAME, install_dir
    from model.config import load_config
    from runtime.schedule import compile_plan, full_schedule, needed_tensors
    from runtime.plan import load_plan, plan_file

    limit = parse_size(shard_size, "--shard-size", binary=False)
    src = Path(source_dir).expanduser().resolve()
    target = Path(out).expanduser().resolve()
    config = load_config(src)
    if config.carried_plan is not None:
        raise UserError(f"--model: {src} already carries a plan (an exported checkpoint?); "
                        f"export from the original checkpoint")
    resolved = load_plan(plan, config.num_layers)
    fmt = choose_format(fmt, resolved)
    shapes = needed_tensors(compile_plan(resolved, config).steps, config)
    if set(tensors) != set(shapes):
        raise ValueError(f"write_checkpoint: tensors must be exactly the plan's kept ones; missing "
                         f"{sorted(set(shapes) - set(tensors))[:3]}, unexpected {sorted(set(tensors) - set(shapes))[:3]}")
    bad = [n for n, t in tensors.items() if tuple(t.shape) != tuple(shapes[n])]
    if bad:
        raise ValueError(f"write_checkpoint: tensor {bad[0]!r} has shape {list(tensors[bad[0]].shape)}, "
                         f"expected {list(shapes[bad[0]])}")
    plan_record = {"version": 1, "name": resolved.name,
                   "drop": {"attention": sorted(resolved.drop_attention), "mlp": sorted(resolved.drop_mlp)},
                   "source": {"tool": "tools.export", "format": fmt, "spec": resolved.spec, **(extra_source or {})}}
    new_config, notes = _exported_config(fmt, read_json(src / "config.json"), config, resolved, plan_record)
    for n in notes:
        print(n, file=log)

    ordered = {name: tensors[name] for name in shapes}
    dtypes = {t.dtype for t in ordered.values()}
    if len(dtypes) > 1:
        raise ValueError(f"write_checkpoint: tensors must share one dtype, got {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    for key in [k for k in ("torch_dtype", "dtype") if k in new_config] or ["torch_dtype"]:
        new_config[key] = str(dtype).removeprefix("torch.")  # what is stored, e.g. after healing in bfloat16
    full = full_schedule(config).weight_bytes(dtype.itemsize)
    with install_dir(out, replace=force, inputs=[src, plan_file(plan)]) as tmp:
        written = _write_tensors(ordered, tmp, limit, progress)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        if fmt == "nemotron-nas":
            (tmp / "configuration_decilm.py").write_text(CONFIGURATION_DECILM)
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copyfile(src / f, tmp / f)
        (tmp / "README.md").write_text(_readme(fmt, target.name, resolved, written, full, notes))
        files = sorted(p.name for p in tmp.iterdir() if p.name != LOCK_NAME)
    print(f"plan: {resolved.describe()}", file=log)
    print(f"format: {fmt}", file=log)
    print(f"weights written: {_mib(written)} ({written} bytes; full checkpoint {_mib(full)}, {full} bytes; "
          f"{100 * written / full:.1f}%)", file=log)
    print(f"wrote {target}", file=log)
    return {"written": written, "full": full, "format": fmt, "files": files, "notes": notes}


def export(model, plan, fmt: str, out, force: bool = False, shard_size="2GB", progress: bool = True,
           log=None) -> dict:
    """Export ``model`` under ``plan`` as ``fmt`` into ``out`` (see ``write_checkpoint``, which this reads
    the kept tensors for, memory-mapped)."""
    from model.atomic import check_target
    from model.config import load_config
    from model.default_model import resolve_model
    from runtime.plan import load_plan, plan_file

    _check_format(fmt)
    if plan is None:
        raise UserError("--plan: required (a plan JSON path or a preset name)")
    parse_size(shard_size, "--shard-size", binary=False)
    src = resolve_model(model, show_progress=progress)
    check_target(out, replace=force, inputs=[src, plan_file(plan)])  # before the slow imports and reads
    config = load_config(src)
    resolved = load_plan(plan, config.num_layers)

    from model.weights import CheckpointReader
    from runtime.schedule import compile_plan, needed_tensors

    shapes = needed_tensors(compile_plan(resolved, config).steps, config)
    reader = CheckpointReader(src)
    try:
        tensors = {name: reader.mapped(name, shape) for name, shape in shapes.items()}
        return write_checkpoint(tensors, src, plan, out, fmt=fmt, force=force, progress=progress,
                                shard_size=shard_size, log=log)
    finally:
        reader.close()


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory or smollm2-135m-instruct (default)")
    p.add_argument("--plan", required=True, help="plan JSON path or preset name")
    p.add_argument("--format", default="auto", help=f"one of: {', '.join(FORMATS)}, auto (default: nemotron-nas "
                   f"unless it cannot express the plan, then llm-drop)")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent unless --force); "
                   "never an input, inside one or containing one")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out once the new one is complete")
    p.add_argument("--shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    args = p.parse_args(argv)
    export(args.model, args.plan, args.format, args.out, force=args.force, shard_size=args.shard_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
