"""LlamaConfig: the validated subset of a Llama-family ``config.json`` that the runtime uses.

Reads both layouts: real Llama-2/3 configs (top-level ``rope_theta``, ``rope_scaling``,
``torch_dtype``) and transformers 5's ``save_pretrained`` (``rope_parameters``, ``dtype``).
Anything we do not implement is a ``UserError`` naming the field.
"""

import dataclasses
import math
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


# Upper bounds well above any real Llama (405B: hidden 16384, intermediate 53248, vocab 128256):
# past them a config is corrupt, not big.
LIMITS = {"hidden_size": 1 << 16, "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 12,
          "num_key_value_heads": 1 << 12, "head_dim": 1 << 10, "intermediate_size": 1 << 20,
          "vocab_size": 1 << 24, "max_position_embeddings": 1 << 24}


def shown(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_int(value, where: str, name: str, lo: int = 1, hi: int | None = None) -> int:
    """``value`` as an int in lo..hi (booleans refused), else a UserError naming ``where`` and ``name``."""
    hi = LIMITS.get(name.rsplit(".", 1)[-1], 1 << 62) if hi is None else hi
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise UserError(f"{where}: field '{name}' must be an integer in {lo}..{hi}, got {shown(value)}")
    return value


def check_number(value, where: str, name: str, hi: float = float("inf")) -> float:
    """``value`` as a finite float in (0, hi] (booleans, NaN and infinities refused)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value <= hi
    if not ok:
        raise UserError(f"{where}: field '{name}' must be a finite number in (0, {hi:g}], got {shown(value)}")
    return float(value)


def check_type(value, kind, where: str, name: str, what: str):
    """``value`` if it is a ``kind`` (booleans are not ints here), else a UserError saying ``what``."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise UserError(f"{where}: field '{name}' must be {what}, got {shown(value)}")
    return value


def check_str_list(value, where: str, name: str) -> list[str]:
    """A list of strings (null or absent: empty)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: field '{name}' must be a list of strings, got {shown(value)}")
    return value


def _token_ids(raw: dict, name: str, where: str, vocab: int) -> tuple[int, ...]:
    value = raw.get(name)
    values = [] if value is None else value if isinstance(value, list) else [value]
    for v in values:
        check_int(v, where, name, 0, vocab - 1)
    return tuple(values)


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


def _rope(raw: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, Llama-3 scaling dict or None) from either layout."""
    rope = raw.get("rope_parameters")
    rope = {} if rope is None else check_type(rope, dict, where, "rope_parameters", "an object")
    theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    theta = check_number(theta, where, "rope_theta" if "rope_theta" in raw else "rope_parameters.rope_theta", 1e12)
    scaling, name = raw.get("rope_scaling"), "rope_scaling"
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling, name = {k: v for k, v in rope.items() if k != "rope_theta"}, "rope_parameters"
    if scaling is None:
        return theta, None
    check_type(scaling, dict, where, name, "an object or null")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise UserError(f"{where}: field '{name}' has type {shown(kind)}; only 'llama3' is supported")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise UserError(f"{where}: field '{name}' is missing '{key}'")
    check_number(scaling["factor"], where, f"{name}.factor", 1e6)
    low = check_number(scaling["low_freq_factor"], where, f"{name}.low_freq_factor", 1e6)
    high = check_number(scaling["high_freq_factor"], where, f"{name}.high_freq_factor", 1e6)
    if high <= low:
        raise UserError(f"{where}: field '{name}.high_freq_factor' ({high}) must exceed 'low_freq_factor' ({low})")
    check_int(scaling["original_max_position_embeddings"], where, f"{name}.original_max_position_embeddings",
              1, LIMITS["max_position_embeddings"])
    return theta, scaling


def parse_config(raw: dict, where: str = "config.json") -> LlamaConfig:
    def field(name, default=..., lo=1):
        if name not in raw or raw[name] is None:
            if default is ...:
                raise UserError(f"{where}: field '{name}' is missing")
            return default
        return check_int(raw[name], where, name, lo)

    archs = check_str_list(raw.get("architectures"), where, "architectures")
    model_type = raw.get("model_type")
    if archs and not set(archs) & SUPPORTED_ARCHITECTURES:
        raise UserError(f"{where}: field 'architectures' is {shown(archs)}; only LlamaForCausalLM "
                        f"(and Mistral-style Llama) checkpoints are supported")
    if model_type not in (None, "llama", "mistral"):
        raise UserError(f"{where}: field 'model_type' is {shown(model_type)}; expected 'llama' or 'mistral'")
    for name in ("attention_bias", "mlp_bias"):
        if check_type(raw.get(name, False), (bool, type(None)), where, name, "true, false or null"):
            raise UserError(f"{where}: field '{name}' is true; biases are not supported")
    if raw.get("sliding_window") is not None:
        raise UserError(f"{where}: field 'sliding_window' is {shown(raw['sliding_window'])}; "
                        f"sliding-window attention is not supported (expected null)")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: field 'hidden_act' is {shown(act)}; expected 'silu'")

    hidden = field("hidden_size")
    heads = field("num_attention_heads")
    kv_heads = field("num_key_value_heads", heads)
    head_dim = field("head_dim", hidden // heads)
    if head_dim == 0:
        raise UserError(f"{where}: field 'head_dim' is missing and hidden_size ({hidden}) / num_attention_heads "
                        f"({heads}) is 0")
    layers = field("num_hidden_layers")
    if heads % kv_heads:
        raise UserError(f"{where}: field 'num_key_value_heads' ({kv_heads}) must divide "
                        f"'num_attention_heads' ({heads})")
    if head_dim % 2:
        raise UserError(f"{where}: field 'head_dim' must be even for rotary embeddings, got {head_dim}")
    theta, scaling = _rope(raw, where)
    vocab = field("vocab_size")
    eps = raw.get("rms_norm_eps")
    dtype = raw.get("torch_dtype", raw.get("dtype"))
    if dtype is not None:
        check_type(dtype, str, where, "torch_dtype" if "torch_dtype" in raw else "dtype", "a string or null")
    tie = raw.get("tie_word_embeddings")
    bos = _token_ids(raw, "bos_token_id", where, vocab)
    if len(bos) > 1:
        raise UserError(f"{where}: field 'bos_token_id' must be one token id or null, got {shown(raw['bos_token_id'])}")

    return LlamaConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=field("intermediate_size", lo=0),  # 0: a checkpoint that keeps no MLP
        vocab_size=vocab,
        rms_norm_eps=1e-6 if eps is None else check_number(eps, where, "rms_norm_eps", 1.0),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=field("max_position_embeddings", 2048),
        tie_word_embeddings=bool(check_type(tie, (bool, type(None)), where, "tie_word_embeddings",
                                            "true, false or null")),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=_token_ids(raw, "eos_token_id", where, vocab),
        torch_dtype=dtype,
    )
