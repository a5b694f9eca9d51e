"""Import a llama-architecture GGUF file into a Hugging Face-style checkpoint directory.

The directory holds `config.json` (LlamaForCausalLM layout), `model.safetensors` (float32),
`generation_config.json` and the tokenizer files, so everything else in sublayer (and
transformers) reads it like any other checkpoint.

- Weights are dequantized with the `gguf` package (`GGUFReader`, `gguf.quants.dequantize`);
  nothing is unpickled.
- llama.cpp's converter permutes the rows of q_proj/k_proj from Hugging Face's half-split rotary
  layout to an interleaved one; we invert that (n_head for q, n_head_kv for k).
- GGUF lists dimensions fastest-first (ne0 = columns), the reverse of torch's order.
- The tokenizer is built by transformers from the GGUF and saved with `save_pretrained`; the
  result is checked to encode like transformers' GGUF tokenizer before it is kept.
- Everything is written to a temporary directory beside `out_dir` and renamed at the end, so a
  failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

from model.errors import UserError

GGUF_MAGIC = b"GGUF"

# GGUF tensor name (after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.").
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp stores Llama-3.1-style rope scaling as a tensor of per-frequency factors.
_ROPE_FREQS = "rope_freqs.weight"


# ----------------------------------------------------------------------------- reading


def _open_reader(path: Path):
    """A GGUFReader for `path`, or a UserError saying why the file can't be one."""
    import gguf

    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # a truncated or corrupt file
        raise UserError(f"{path}: cannot read GGUF file: {e}") from e


def _metadata(reader) -> dict:
    """Scalar and string metadata (plus short arrays); the big tokenizer arrays are skipped."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[1] in (
            "tokens", "scores", "token_type", "merges"
        ):
            meta[key] = len(field.data)  # only the count is needed here
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - an odd field we don't need
            continue
    return meta


def _require(meta: dict, key: str, path: Path):
    if key not in meta:
        raise UserError(f"{path}: GGUF metadata has no {key!r}")
    return meta[key]


def _float32_repr(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _llama3_rope_scaling(freqs: np.ndarray, theta: float, head_dim: int, path: Path) -> dict:
    """Recover Llama-3.1 rope scaling from llama.cpp's rope_freqs tensor.

    llama.cpp writes one factor per rotary frequency, computed from (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings). The tensor doesn't name them, so we try
    the values every Llama-3.x release uses and accept them only if they reproduce it exactly.
    """
    factors = np.asarray(freqs, dtype=np.float64).reshape(-1)
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = float(factors.max())
    for low, high, old in ((1.0, 4.0, 8192),):
        low_wavelen, high_wavelen = old / low, old / high
        expect = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                expect.append(1.0)
            elif wavelen > low_wavelen:
                expect.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                expect.append(1 / ((1 - smooth) / factor + smooth))
        if len(expect) == len(factors) and np.allclose(expect, factors, rtol=1e-5, atol=1e-6):
            return {
                "rope_type": "llama3",
                "factor": _float32_repr(factor),
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": old,
            }
    raise UserError(f"{path}: {_ROPE_FREQS} holds rope scaling factors that match no known llama3 setting")


def _rope_scaling(meta: dict, arch: str, path: Path) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind is None or kind == "none":
        return None
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if factor is None:
        raise UserError(f"{path}: rope scaling type {kind!r} without {arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32_repr(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": _float32_repr(factor)}
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        return scaling
    raise UserError(f"{path}: unsupported rope scaling type {kind!r} (supported: linear, yarn)")


def _build_config(reader, meta: dict, path: Path) -> dict:
    arch = _require(meta, "general.architecture", path)
    if arch != "llama":
        raise UserError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    if meta.get(f"{arch}.expert_count", 0):
        raise UserError(f"{path}: mixture-of-experts llama models are not supported")

    hidden = int(_require(meta, f"{arch}.embedding_length", path))
    n_head = int(_require(meta, f"{arch}.attention.head_count", path))
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_head))
    if int(meta.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise UserError(f"{path}: key and value head sizes differ; not a Llama layout")
    rot = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise UserError(f"{path}: partial rotary embeddings ({rot} of {head_dim}) are not supported")

    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise UserError(f"{path}: no token_embd.weight tensor")
    vocab = int(embd.shape[-1])  # rows of the embedding (GGUF shape is [hidden, vocab])
    if int(meta.get(f"{arch}.vocab_size", vocab)) != vocab:
        raise UserError(f"{path}: {arch}.vocab_size {meta[f'{arch}.vocab_size']} != token_embd rows {vocab}")

    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    rope_scaling = _rope_scaling(meta, arch, path)
    if _ROPE_FREQS in names:
        freqs = next(t for t in reader.tensors if t.name == _ROPE_FREQS)
        if rope_scaling is not None:
            raise UserError(f"{path}: both {_ROPE_FREQS} and rope scaling metadata; can't tell which applies")
        rope_scaling = _llama3_rope_scaling(np.array(freqs.data), theta, head_dim, path)

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, f"{arch}.feed_forward_length", path)),
        "num_hidden_layers": int(_require(meta, f"{arch}.block_count", path)),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": _float32_repr(float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5))),
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    for name in ("bos", "eos", "pad"):
        key = f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id"
        if key in meta:
            config[f"{name}_token_id"] = int(meta[key])
    return config


def _tensor_plan(reader, config: dict, path: Path) -> list:
    """(gguf tensor, hf name, hf shape, rows-permutation heads or None) for every tensor we keep."""
    n_layers = config["num_hidden_layers"]
    plan = []
    for t in reader.tensors:
        name = t.name
        if name == _ROPE_FREQS:
            continue  # folded into config.rope_scaling
        if name in _GLOBAL_TENSORS:
            hf = _GLOBAL_TENSORS[name]
        else:
            parts = name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in _LAYER_TENSORS:
                raise UserError(f"{path}: unsupported tensor {name!r} for a Llama model")
            layer = int(parts[1])
            if layer >= n_layers:
                raise UserError(f"{path}: tensor {name!r} beyond block_count {n_layers}")
            hf = f"model.layers.{layer}.{_LAYER_TENSORS[parts[2]]}"
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (columns) first
        heads = None
        if name.endswith("attn_q.weight"):
            heads = config["num_attention_heads"]
        elif name.endswith("attn_k.weight"):
            heads = config["num_key_value_heads"]
        plan.append((t, hf, shape, heads))

    have = {hf for _, hf, _, _ in plan}
    want = {"model.embed_tokens.weight", "model.norm.weight"}
    want |= {f"model.layers.{i}.{v}" for i in range(n_layers) for v in _LAYER_TENSORS.values()}
    missing = sorted(want - have)
    if missing:
        raise UserError(f"{path}: missing {len(missing)} tensor(s), e.g. {missing[0]!r} (GGUF name differs?)")
    return plan


# ----------------------------------------------------------------------------- converting


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's rotary permutation of q/k rows (interleaved -> half-split per head)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise UserError(f"cannot undo the rotary permutation: {rows} rows for {n_head} heads")
    dim = rows // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t, shape: tuple, path: Path) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType(t.tensor_type)
    try:
        w = quants.dequantize(np.asarray(t.data), qtype)
    except NotImplementedError as e:
        raise UserError(f"{path}: tensor {t.name!r} has unsupported quantization type {qtype.name}") from e
    if qtype == GGMLQuantizationType.F32:
        w = np.array(w, dtype=np.float32)  # copy out of the memory map
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.size != math.prod(shape):
        raise UserError(f"{path}: tensor {t.name!r} holds {w.size} values, expected shape {shape}")
    return w.reshape(shape)


def _write_safetensors(out: Path, plan: list, path: Path, *, show_progress: bool, metadata: dict) -> None:
    """Stream float32 tensors into one safetensors file, one tensor in memory at a time."""
    from tqdm.auto import tqdm

    header = {"__metadata__": metadata}
    offset = 0
    for _, hf, shape, _ in plan:
        nbytes = 4 * math.prod(shape)
        header[hf] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned

    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        bar = tqdm(plan, desc=f"importing {path.name}", unit="tensor", disable=not show_progress, file=sys.stderr)
        for t, hf, shape, heads in bar:
            w = _dequantize(t, shape, path)
            if heads is not None:
                w = _unpermute_rows(w, heads)
            f.write(np.ascontiguousarray(w, dtype="<f4").tobytes())


def _write_tokenizer(gguf_path: Path, meta: dict, config: dict, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            # The same GGUF conversion AutoTokenizer runs, without its second full parse of the
            # file's metadata (3 s for SmolLM2's 49k tokens); the test checks the two agree.
            tok = PreTrainedTokenizerFast(gguf_file=gguf_path.name, name_or_path=str(gguf_path.parent))
        except Exception:  # noqa: BLE001 - an older/newer transformers: take the public route
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise UserError(f"{gguf_path}: cannot build a tokenizer from the GGUF metadata: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    tok.save_pretrained(str(out))

    tok_model = meta.get("tokenizer.ggml.model")
    # llama.cpp adds BOS to sentencepiece ("llama") vocabularies unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", tok_model == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tok.convert_ids_to_tokens(int(i)) if i is not None else None

    specials = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    specials = {k: v for k, v in specials.items() if v is not None}

    # Make tokenizer.json's post-processor say the same as the add_bos/add_eos flags, so a reader
    # of tokenizer.json alone (tokenizers.Tokenizer) adds exactly what llama.cpp adds.
    backend = Tokenizer.from_file(str(out / "tokenizer.json"))
    single, pair, special = "$A:0", "$A:0 $B:1", []
    if add_bos and "bos_token" in specials:
        single, pair = f"{specials['bos_token']}:0 {single}", f"{specials['bos_token']}:0 $A:0 {specials['bos_token']}:1 $B:1"
        special.append((specials["bos_token"], int(meta["tokenizer.ggml.bos_token_id"])))
    if add_eos and "eos_token" in specials:
        single += f" {specials['eos_token']}:0"
        pair += f" {specials['eos_token']}:1"
        special.append((specials["eos_token"], int(meta["tokenizer.ggml.eos_token_id"])))
    special = list(dict.fromkeys(special))
    backend.post_processor = TemplateProcessing(single=single, pair=pair, special_tokens=special)
    backend.save(str(out / "tokenizer.json"))

    chat_template = meta.get("tokenizer.chat_template")
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    _write_json(out / "tokenizer_config.json", tok_config)
    _write_json(out / "special_tokens_map.json", specials)

    _check_tokenizer(tok, out / "tokenizer.json", add_bos, add_eos, gguf_path)


_TOKENIZER_PROBE = "Hello, world! The year 2024 had 366 days.\n  Indented code: x = f(y) * 3.14 <- ünïcödé 日本語"


def _check_tokenizer(hf_tok, tokenizer_json: Path, add_bos: bool, add_eos: bool, gguf_path: Path) -> None:
    """The saved tokenizer must encode like transformers' GGUF tokenizer and decode its own output."""
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(tokenizer_json))
    ours = saved.encode(_TOKENIZER_PROBE, add_special_tokens=False).ids
    ref = hf_tok.encode(_TOKENIZER_PROBE, add_special_tokens=False)
    if ours != ref:
        raise UserError(f"{gguf_path}: the converted tokenizer disagrees with transformers' GGUF tokenizer")
    if saved.decode(ours, skip_special_tokens=False) != _TOKENIZER_PROBE:
        raise UserError(f"{gguf_path}: the converted tokenizer does not decode its own output back to the text")
    with_specials = saved.encode("Hello").ids
    bos_ok = (with_specials[0] == hf_tok.bos_token_id) == add_bos
    eos_ok = (with_specials[-1] == hf_tok.eos_token_id) == add_eos
    if not (bos_ok and eos_ok):
        raise UserError(f"{gguf_path}: the converted tokenizer adds BOS/EOS differently from the GGUF flags")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- entry point


def _is_nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def import_gguf(gguf_path, out_dir, *, show_progress: bool = True, overwrite: bool = False) -> Path:
    """Convert the llama GGUF at `gguf_path` into a checkpoint directory `out_dir`; return it.

    `out_dir` must not exist or be empty unless `overwrite`; then it is replaced only once the new
    checkpoint is complete. Errors about the input raise `UserError` naming the file.
    """
    gguf_path = Path(gguf_path).expanduser()
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if _is_nonempty_dir(out_dir) and not overwrite:
        raise UserError(f"{out_dir}: already exists and is not empty")

    reader = _open_reader(gguf_path)
    meta = _metadata(reader)
    config = _build_config(reader, meta, gguf_path)
    plan = _tensor_plan(reader, config, gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.importing-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the checkpoint should not be
    try:
        source = {
            "format": "pt",
            "source": gguf_path.name,
            "source_file_type": str(meta.get("general.file_type", "")),
            "source_name": str(meta.get("general.name", "")),
        }
        _write_safetensors(tmp / "model.safetensors", plan, gguf_path, show_progress=show_progress, metadata=source)
        _write_tokenizer(gguf_path, meta, config, tmp)
        _write_json(tmp / "config.json", config)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        _write_json(tmp / "generation_config.json", generation)
        del reader  # release the memory map before renaming (matters on Windows)
        _install(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished `tmp` into place as `out_dir` with renames only."""
    old = None
    if out_dir.exists() and overwrite and _is_nonempty_dir(out_dir):
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)  # succeeds onto a missing or empty directory
    except OSError as e:
        if old is not None:
            os.replace(old, out_dir)
        if _is_nonempty_dir(out_dir):  # someone else finished first
            raise UserError(f"{out_dir}: already exists and is not empty") from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
