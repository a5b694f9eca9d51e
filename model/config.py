"""LlamaConfig: the validated subset of a Llama-family ``config.json`` that the runtime uses.

Reads both layouts: real Llama-2/3 configs (top-level ``rope_theta``, ``rope_scaling``,
``torch_dtype``) and transformers 5's ``save_pretrained`` (``rope_parameters``, ``dtype``).
Anything we do not implement is a ``UserError`` naming the field.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from model.errors import UserError, read_json

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}


@dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None = None
    # the plan a Nemotron-NAS / LLM-Drop checkpoint's config carries (its dropped sublayers), else None
    carried_plan: dict | None = dataclasses.field(default=None, compare=False)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def load_config(checkpoint_dir) -> LlamaConfig:
    """Parse ``checkpoint_dir/config.json``; raises UserError for anything unsupported."""
    path = Path(checkpoint_dir) / "config.json"
    if not Path(checkpoint_dir).is_dir():
        raise UserError(f"{checkpoint_dir}: no such checkpoint directory")
    if not path.is_file():
        raise UserError(f"{path}: missing; a checkpoint directory needs a config.json")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object")
    from model.formats import checkpoint_plan  # Nemotron-NAS / LLM-Drop -> plain Llama config

    raw, plan = checkpoint_plan(checkpoint_dir, raw)
    return dataclasses.replace(parse_config(raw, str(path)), carried_plan=plan)


def parse_config(raw: dict, where: str = "config.json") -> LlamaConfig:
    def field(name, kind, default=...):
        if name not in raw or raw[name] is None:
            if default is ...:
                raise UserError(f"{where}: field '{name}' is missing")
            return default
        value = raw[name]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if not ok:
            raise UserError(f"{where}: field '{name}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if archs and not set(archs) & SUPPORTED_ARCHITECTURES:
        raise UserError(f"{where}: field 'architectures' is {archs}; only LlamaForCausalLM "
                        f"(and Mistral-style Llama) checkpoints are supported")
    if model_type not in (None, "llama", "mistral"):
        raise UserError(f"{where}: field 'model_type' is {model_type!r}; expected 'llama' or 'mistral'")
    for name in ("attention_bias", "mlp_bias"):
        if raw.get(name):
            raise UserError(f"{where}: field '{name}' is true; biases are not supported")
    if raw.get("sliding_window") is not None:
        raise UserError(f"{where}: field 'sliding_window' is {raw['sliding_window']}; "
                        f"sliding-window attention is not supported (expected null)")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: field 'hidden_act' is {act!r}; expected 'silu'")

    hidden = field("hidden_size", int)
    heads = field("num_attention_heads", int)
    kv_heads = field("num_key_value_heads", int, heads)
    head_dim = field("head_dim", int, hidden // heads if heads else 0)
    layers = field("num_hidden_layers", int)
    for name, v in (("hidden_size", hidden), ("num_attention_heads", heads),
                    ("num_key_value_heads", kv_heads), ("head_dim", head_dim), ("num_hidden_layers", layers)):
        if v <= 0:
            raise UserError(f"{where}: field '{name}' must be positive, got {v}")
    if heads % kv_heads:
        raise UserError(f"{where}: field 'num_key_value_heads' ({kv_heads}) must divide "
                        f"'num_attention_heads' ({heads})")
    if head_dim % 2:
        raise UserError(f"{where}: field 'head_dim' must be even for rotary embeddings, got {head_dim}")

    rope = raw.get("rope_parameters") or {}
    theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise UserError(f"{where}: field 'rope_scaling' has type {kind!r}; only 'llama3' is supported")
        else:
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in scaling:
                    raise UserError(f"{where}: field 'rope_scaling' is missing '{key}'")

    return LlamaConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=field("intermediate_size", int),
        vocab_size=field("vocab_size", int),
        rms_norm_eps=float(field("rms_norm_eps", (int, float), 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=field("max_position_embeddings", int, 2048),
        tie_word_embeddings=bool(field("tie_word_embeddings", bool, False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_ids(raw.get("eos_token_id")),
        torch_dtype=raw.get("torch_dtype", raw.get("dtype")),
    )
