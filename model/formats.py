"""Checkpoint formats that carry a layer-drop plan: Nemotron-NAS (DeciLM) and LLM-Drop.

``checkpoint_plan(checkpoint_dir, raw_config)`` turns either into a plain Llama config dict plus an
explicit plan dict (``{"version": 1, "name": ..., "drop": {"attention": [...], "mlp": [...]}}``), or
returns the config unchanged and ``None`` for an ordinary Llama checkpoint.

* **Nemotron-NAS** (``"model_type": "nemotron-nas"``, ``DeciLMForCausalLM``): one ``block_configs``
  entry per layer, ``{"attention": {"no_op", "replace_with_linear", "n_heads_in_group", ...},
  "ffn": {"no_op", "replace_with_linear", "ffn_mult" | "intermediate_size", ...}}``. A no-op sublayer
  has no tensors (its norm included). vLLM (``vllm/model_executor/models/nemotron_nas.py``) computes a
  kept FFN's width as ``round_up(int(2 * ffn_mult * hidden / 3), 256)`` when the ffn config has an
  ``ffn_mult`` attribute, else reads ``ffn.intermediate_size``; KV heads are
  ``num_attention_heads // n_heads_in_group``. This runtime needs both uniform across kept layers.
* **LLM-Drop** (CASE-Lab-UMD/LLM-Drop): an ordinary Llama/Mistral config plus ``drop_attn_list`` /
  ``drop_mlp_list``, each either layer indices or one boolean per layer.
"""

from pathlib import Path

from model.config import LIMITS, check_int, check_number, check_str_list, check_type, shown
from model.errors import UserError

NEMOTRON_NAS = "nemotron-nas"
DECILM_ARCH = "DeciLMForCausalLM"
PLAN_KEY = "sublayer_plan"  # where our exporter records the plan it applied (informational)


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """vLLM's / DeciLM's formula: int(2 * ffn_mult * hidden / 3) rounded up to a multiple of 256."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def intermediate_size_to_ffn_mult(intermediate_size: int, hidden_size: int) -> float | None:
    """An ffn_mult that reproduces ``intermediate_size`` through the formula, also after NVIDIA's
    config class rounds it to 6 decimals; None when no multiplier can (sizes not multiple of 256)."""
    if intermediate_size <= 0 or intermediate_size % 256:
        return None
    exact = 3 * intermediate_size / (2 * hidden_size)
    for digits in (6, 5, 4, 3, 2, 1, 0):
        m = round(exact, digits)
        for cand in (m, round(m + 10 ** -6, 6), round(m - 10 ** -6, 6)):
            if cand > 0 and ffn_mult_to_intermediate_size(round(cand, 6), hidden_size) == intermediate_size:
                return round(cand, 6)
    return None


def _plan_name(raw: dict, default: str) -> str:
    rec = raw.get(PLAN_KEY)
    if isinstance(rec, dict) and isinstance(rec.get("name"), str):
        return rec["name"]
    return default


def _make_plan(name: str, attention, mlp) -> dict | None:
    attention, mlp = sorted(set(attention)), sorted(set(mlp))
    if not attention and not mlp:
        return None
    return {"version": 1, "name": name, "drop": {"attention": attention, "mlp": mlp}}


def checkpoint_plan(checkpoint_dir, raw_config: dict) -> tuple[dict, dict | None]:
    """(plain Llama raw config, plan dict or None) for a checkpoint's parsed ``config.json``."""
    where = str(Path(checkpoint_dir) / "config.json")
    if not isinstance(raw_config, dict):
        raise UserError(f"{where}: expected a JSON object")
    archs = check_str_list(raw_config.get("architectures"), where, "architectures")
    if raw_config.get("model_type") == NEMOTRON_NAS or DECILM_ARCH in archs:
        return _nemotron_nas(raw_config, where)
    if "drop_attn_list" in raw_config or "drop_mlp_list" in raw_config:
        return _llm_drop(raw_config, where)
    return raw_config, None


def _nemotron_nas(raw: dict, where: str) -> tuple[dict, dict | None]:
    L = check_int(raw.get("num_hidden_layers"), where, "num_hidden_layers")
    hidden = check_int(raw.get("hidden_size"), where, "hidden_size")
    heads = check_int(raw.get("num_attention_heads"), where, "num_attention_heads")
    blocks = raw.get("block_configs")
    if not isinstance(blocks, list) or len(blocks) != L:
        got = len(blocks) if isinstance(blocks, list) else shown(blocks)
        raise UserError(f"{where}: field 'block_configs' must be a list of {L} entries (one per layer), got {got}")
    drop_attn, drop_mlp = [], []
    groups: dict[int, int] = {}   # layer -> n_heads_in_group of kept attention
    sizes: dict[int, int] = {}    # layer -> intermediate size of kept FFN
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or not isinstance(block.get("attention"), dict) or not isinstance(block.get("ffn"), dict):
            raise UserError(f"{where}: field 'block_configs[{i}]' must be an object with 'attention' and 'ffn' objects")
        attn, ffn = block["attention"], block["ffn"]
        for kind, sub in (("attention", attn), ("ffn", ffn)):
            for key in ("replace_with_linear", "no_op"):
                check_type(sub.get(key, False), (bool, type(None)), where, f"block_configs[{i}].{kind}.{key}",
                           "true, false or null")
            if sub.get("replace_with_linear"):
                raise UserError(f"{where}: field 'block_configs[{i}].{kind}.replace_with_linear' is true: "
                                f"linear replacement sublayers are not supported (only no_op or a full sublayer)")
        if attn.get("no_op", False):
            drop_attn.append(i)
        else:
            for key in ("window_length", "num_sink_tokens", "mamba", "llama4"):
                if attn.get(key) is not None:
                    raise UserError(f"{where}: field 'block_configs[{i}].attention.{key}' is set; "
                                    f"only plain (grouped-query) attention is supported")
            g = attn.get("n_heads_in_group")
            if not isinstance(g, int) or isinstance(g, bool) or g <= 0 or heads % g:
                raise UserError(f"{where}: field 'block_configs[{i}].attention.n_heads_in_group' must be a positive "
                                f"divisor of num_attention_heads ({heads}), got {shown(g)}")
            groups[i] = g
        if ffn.get("no_op", False):
            drop_mlp.append(i)
        else:
            act = ffn.get("hidden_act", raw.get("hidden_act", "silu"))
            if act != "silu":
                raise UserError(f"{where}: field 'block_configs[{i}].ffn.hidden_act' is {shown(act)}; expected 'silu'")
            if ffn.get("moe") is not None:
                raise UserError(f"{where}: field 'block_configs[{i}].ffn.moe' is set; MoE FFNs are not supported")
            mult = ffn.get("ffn_mult")
            if mult is not None:
                mult = check_number(mult, where, f"block_configs[{i}].ffn.ffn_mult", 1e3)
                sizes[i] = ffn_mult_to_intermediate_size(mult, hidden)
                if sizes[i] > LIMITS["intermediate_size"]:
                    raise UserError(f"{where}: field 'block_configs[{i}].ffn.ffn_mult' ({mult}) gives an FFN width of "
                                    f"{sizes[i]}, above {LIMITS['intermediate_size']}")
            elif ffn.get("intermediate_size") is None:
                raise UserError(f"{where}: field 'block_configs[{i}].ffn' needs 'ffn_mult' or 'intermediate_size', "
                                f"got {shown(ffn)}")
            else:
                sizes[i] = check_int(ffn["intermediate_size"], where, f"block_configs[{i}].ffn.intermediate_size")
    for what, field, values in (("attention", "attention.n_heads_in_group", groups),
                                ("MLP", "ffn intermediate size (ffn_mult / intermediate_size)", sizes)):
        if len(set(values.values())) > 1:
            first = min(values)
            odd = next(i for i in sorted(values) if values[i] != values[first])
            raise UserError(f"{where}: field 'block_configs[{odd}].{field.split(' ')[0]}' gives {values[odd]} but layer "
                            f"{first} gives {values[first]}: this runtime needs the same {field} in every kept "
                            f"{what} sublayer (non-uniform layers are not supported)")
    out = {k: v for k, v in raw.items() if k not in ("block_configs", "auto_map", PLAN_KEY)}
    out["model_type"] = "llama"
    out["architectures"] = ["LlamaForCausalLM"]
    g = next(iter(groups.values()), 1)
    out["num_key_value_heads"] = heads // g
    out["intermediate_size"] = next(iter(sizes.values()), 0)  # 0: no MLP kept, none is ever built
    return out, _make_plan(_plan_name(raw, NEMOTRON_NAS), drop_attn, drop_mlp)


def _drop_list(raw: dict, name: str, L: int, where: str) -> list[int]:
    value = raw.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{where}: field '{name}' must be a list of layer indices or of {L} booleans, got {shown(value)}")
    if value and all(isinstance(v, bool) for v in value):
        if len(value) != L:
            raise UserError(f"{where}: field '{name}' is a list of {len(value)} booleans; expected one per layer ({L})")
        return [i for i, v in enumerate(value) if v]
    ids = []
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool):
            raise UserError(f"{where}: field '{name}' must hold only layer indices or only booleans, got {shown(v)}")
        if not 0 <= v < L:
            raise UserError(f"{where}: field '{name}' has layer {v}, expected 0..{L - 1} for a {L}-layer model")
        ids.append(v)
    return ids


def _llm_drop(raw: dict, where: str) -> tuple[dict, dict | None]:
    L = check_int(raw.get("num_hidden_layers"), where, "num_hidden_layers")
    attn = _drop_list(raw, "drop_attn_list", L, where)
    mlp = _drop_list(raw, "drop_mlp_list", L, where)
    out = {k: v for k, v in raw.items() if k not in ("drop_attn_list", "drop_mlp_list", "auto_map", PLAN_KEY)}
    return out, _make_plan(_plan_name(raw, "llm-drop"), attn, mlp)
