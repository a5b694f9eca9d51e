"""Import a llama-architecture GGUF file into a Hugging Face-style checkpoint directory.

The directory holds `config.json` (LlamaForCausalLM layout), `model.safetensors` (float32),
`generation_config.json` and the tokenizer files, so everything else in sublayer (and
transformers) reads it like any other checkpoint.

- Weights are dequantized with the `gguf` package (`GGUFReader`, `gguf.quants.dequantize`);
  nothing is unpickled. With ``keep_quant``, Q8_0 / Q4_0 / Q4_1 matrices are kept as their blocks
  instead, stored as ``model.quant.QuantWeight`` parts (the stored-quantized format of
  ``model.weights``); every other type is still dequantized (a note says which), norms stay float.
- llama.cpp's converter permutes the rows of q_proj/k_proj from Hugging Face's half-split rotary
  layout to an interleaved one; we invert that (n_head for q, n_head_kv for k), for kept blocks
  block-row by block-row (a row's blocks, scales and offsets move with it).
- GGUF lists dimensions fastest-first (ne0 = columns), the reverse of torch's order.
- The tokenizer is built by transformers from the GGUF and saved with `save_pretrained`; the
  result is checked to encode like transformers' GGUF tokenizer before it is kept.
- Everything is written through `model.atomic.install_dir` (a temporary directory beside `out_dir`,
  renamed in at the end), so a failure or Ctrl-C leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import numpy as np

from model.config import parse_config
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
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    size = path.stat().st_size
    try:
        expected = _expected_size(path)
    except _HeaderCut:
        raise UserError(f"{path}: truncated: the file ends at byte {size}, inside its header "
                        f"(a complete file is larger; download it again)") from None
    if expected is not None and size < expected:
        raise UserError(f"{path}: truncated: {size} bytes, expected {expected} bytes (header and tensor data, "
                        f"from its header); download it again")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # a corrupt file
        raise UserError(f"{path}: cannot read GGUF file: {e}") from None


class _HeaderCut(Exception):
    """The file ends inside its GGUF header."""


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY, _UINT32 = 8, 9, 4


def _expected_size(path: Path) -> int | None:
    """Bytes a complete GGUF needs (aligned header + the furthest tensor's end), walking its header;
    ``_HeaderCut`` when the header runs past the end, None where the header is not understood (the
    ``gguf`` reader then says what is wrong)."""
    import gguf

    import mmap

    with open(path, "rb") as f:  # at least the 4 magic bytes: mmap needs a non-empty file
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    size, pos = len(buf), 4
    if size < 8:
        raise _HeaderCut
    order = ">" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF == 0 else "<"  # as GGUFReader tells byte order

    def take(fmt):
        nonlocal pos
        try:
            values = struct.unpack_from(order + fmt, buf, pos)
        except struct.error:
            raise _HeaderCut from None
        pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def skip(n):
        nonlocal pos
        pos += n
        if pos > size:
            raise _HeaderCut

    def value(kind):
        if kind == _UINT32:
            return take("I")
        if kind in _SCALAR_BYTES:
            return skip(_SCALAR_BYTES[kind])
        if kind == _STRING:
            return skip(take("Q"))
        if kind == _ARRAY:
            item, n = take("I"), take("Q")
            if item in _SCALAR_BYTES:
                return skip(n * _SCALAR_BYTES[item])
            if pos + 8 * n > size:
                raise _HeaderCut
            for _ in range(n):
                value(item)
            return None
        raise ValueError(kind)

    try:
        take("I")  # version
        n_tensors, n_kv = take("Q"), take("Q")
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            start = pos
            key_len = take("Q")
            skip(key_len)
            key = bytes(buf[start + 8:start + 8 + key_len])
            kind = take("I")
            v = value(kind)
            if key == b"general.alignment" and kind == _UINT32 and v:
                alignment = v
        end = 0
        for _ in range(n_tensors):
            skip(take("Q"))
            n_dims = take("I")
            dims = [take("Q") for _ in range(n_dims)]
            qtype, offset = take("I"), take("Q")
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            end = max(end, offset + math.prod(dims) // block * type_size)
    except (ValueError, KeyError):
        return None
    return pos + (-pos % alignment) + end


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


def _meta_int(meta: dict, key: str, path: Path, default=..., lo: int = 1) -> int:
    """Metadata ``key`` as an integer >= lo (``default`` when absent; required without one)."""
    value = _require(meta, key, path) if default is ... else meta.get(key, default)
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < lo:
        raise UserError(f"{path}: GGUF metadata {key} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _meta_float(meta: dict, key: str, path: Path, default: float) -> float:
    """Metadata ``key`` as a finite positive number (``default`` when absent)."""
    value = meta.get(key, default)
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
    if not ok or not math.isfinite(value) or value <= 0:
        raise UserError(f"{path}: GGUF metadata {key} must be a finite positive number, got {value!r}")
    return float(value)


def _float32_repr(x: float) -> float:
    """The shortest decimal that rounds to the same float32 (9.999999747e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _llama3_rope_scaling(freqs: np.ndarray, theta: float, head_dim: int, path: Path) -> dict:
    """Recover Llama-3.1 rope scaling from llama.cpp's rope_freqs tensor.

    llama.cpp writes one divisor per rotary frequency, computed from (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings). The tensor doesn't name them, so we try
    the values every Llama-3.x release uses and accept them only if ``kernels.rotary.rope_inv_freq``
    (the runtime's own formula) reproduces the tensor.
    """
    from kernels.rotary import rope_inv_freq

    factors = np.asarray(freqs, dtype=np.float64).reshape(-1)
    plain = rope_inv_freq(head_dim, theta).double().numpy()
    factor = float(factors.max())
    for low, high, old in ((1.0, 4.0, 8192),):
        scaling = {"rope_type": "llama3", "factor": _float32_repr(factor), "low_freq_factor": low,
                   "high_freq_factor": high, "original_max_position_embeddings": old}
        expect = plain / rope_inv_freq(head_dim, theta, scaling).double().numpy()
        if len(expect) == len(factors) and np.allclose(expect, factors, rtol=1e-5, atol=1e-6):
            return scaling
    raise UserError(f"{path}: {_ROPE_FREQS} holds rope scaling factors that match no known llama3 setting")


def _refuse_rope_scaling_metadata(meta: dict, arch: str, path: Path) -> None:
    """GGUF rope scaling metadata (linear / yarn) is refused: the runtime implements only Llama-3
    scaling, which llama.cpp stores as the rope_freqs tensor instead."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        raise UserError(f"{path}: {arch}.rope.scaling.type is {kind!r}; this runtime supports only Llama-3 rope "
                        f"scaling (the {_ROPE_FREQS} tensor), not linear or yarn scaling")


def _build_config(reader, meta: dict, path: Path) -> dict:
    arch = _require(meta, "general.architecture", path)
    if arch != "llama":
        raise UserError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    if meta.get(f"{arch}.expert_count", 0):
        raise UserError(f"{path}: mixture-of-experts llama models are not supported")

    hidden = _meta_int(meta, f"{arch}.embedding_length", path)
    n_head = _meta_int(meta, f"{arch}.attention.head_count", path)
    n_head_kv = _meta_int(meta, f"{arch}.attention.head_count_kv", path, n_head)
    head_dim = _meta_int(meta, f"{arch}.attention.key_length", path, max(1, hidden // n_head))
    if _meta_int(meta, f"{arch}.attention.value_length", path, head_dim) != head_dim:
        raise UserError(f"{path}: key and value head sizes differ; not a Llama layout")
    rot = _meta_int(meta, f"{arch}.rope.dimension_count", path, head_dim)
    if rot != head_dim:
        raise UserError(f"{path}: partial rotary embeddings ({rot} of {head_dim}) are not supported")

    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise UserError(f"{path}: no token_embd.weight tensor")
    vocab = int(embd.shape[-1])  # rows of the embedding (GGUF shape is [hidden, vocab])
    if _meta_int(meta, f"{arch}.vocab_size", path, vocab) != vocab:
        raise UserError(f"{path}: {arch}.vocab_size {meta[f'{arch}.vocab_size']} != token_embd rows {vocab}")

    theta = _meta_float(meta, f"{arch}.rope.freq_base", path, 10000.0)
    _refuse_rope_scaling_metadata(meta, arch, path)
    rope_scaling = None
    if _ROPE_FREQS in names:
        freqs = next(t for t in reader.tensors if t.name == _ROPE_FREQS)
        rope_scaling = _llama3_rope_scaling(np.array(freqs.data), theta, head_dim, path)

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _meta_int(meta, f"{arch}.feed_forward_length", path),
        "num_hidden_layers": _meta_int(meta, f"{arch}.block_count", path),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": _meta_int(meta, f"{arch}.context_length", path, 2048),
        "rms_norm_eps": _float32_repr(_meta_float(meta, f"{arch}.attention.layer_norm_rms_epsilon", path, 1e-5)),
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
            config[f"{name}_token_id"] = _meta_int(meta, key, path, lo=0)
    parse_config(config, f"{path} (as config.json)")  # the runtime's own checks, before anything is written
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
    except (ValueError, TypeError) as e:  # blocks that do not fit the tensor's shape
        raise UserError(f"{path}: tensor {t.name!r} cannot be dequantized as {qtype.name} ({e})") from None
    if qtype == GGMLQuantizationType.F32:
        w = np.array(w, dtype=np.float32)  # copy out of the memory map
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.size != math.prod(shape):
        raise UserError(f"{path}: tensor {t.name!r} holds {w.size} values, expected shape {shape}")
    return w.reshape(shape)


# GGUF block types kept as blocks under keep_quant -> the stored type (model.weights.QUANT_TYPES).
KEPT_TYPES = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
_FUSED = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))  # read as one matrix by the runtime


def _gguf_blocks(t, shape: tuple, path: Path):
    """A Q8_0 / Q4_0 / Q4_1 tensor's blocks as a QuantWeight of float shape ``shape`` = [N, K] (numpy
    parts copied out of the memory map; nothing dequantized). Q4_0's offset is -8 d (exact in float16)."""
    import torch
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from model.quant import QuantWeight

    qtype = GGMLQuantizationType(t.tensor_type)
    block, type_size = GGML_QUANT_SIZES[qtype]
    N, K = shape
    raw = np.asarray(t.data)
    if raw.dtype != np.uint8 or K % block or raw.size != N * (K // block) * type_size:
        raise UserError(f"{path}: tensor {t.name!r} holds {raw.size} bytes of {qtype.name} blocks, expected "
                        f"{N * (K // block) * type_size} for shape {list(shape)}")
    b = raw.reshape(N, K // block, type_size)
    scale = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0]  # [N, K / 32]
    if qtype.name == "Q8_0":
        return QuantWeight(torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(N, K)),
                           torch.from_numpy(scale), None, block)
    if qtype.name == "Q4_1":
        offset, nibbles = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0], b[..., 4:]
    else:  # Q4_0: w = (q - 8) d = q d + (-8 d)
        with np.errstate(over="ignore"):  # checked just below
            offset, nibbles = (scale.astype(np.float32) * -8).astype(np.float16), b[..., 2:]
        if not np.array_equal(np.isfinite(offset), np.isfinite(scale)):
            raise UserError(f"{path}: tensor {t.name!r} has Q4_0 scales too large to keep as blocks "
                            f"(-8 d overflows float16); import it without --keep-quant")
    return QuantWeight(torch.from_numpy(np.ascontiguousarray(nibbles).reshape(N, K // 2)), torch.from_numpy(scale),
                       torch.from_numpy(np.ascontiguousarray(offset)), block)


def _kept_tensors(plan: list, path: Path) -> dict[str, str]:
    """HF name -> stored type of the tensors kept as blocks: Q8_0 / Q4_0 / Q4_1 matrices, except where
    tensors the runtime fuses into one matrix (q/k/v, gate/up) would not share a kind (those are all
    dequantized). Notes on stderr name what is dequantized and why; UserError when nothing can be kept."""
    from model.weights import QUANT_TYPES

    qtype = {t.name: t.tensor_type.name for t, _, _, _ in plan}
    kept = {t.name: KEPT_TYPES[qtype[t.name]] for t, _, shape, _ in plan
            if len(shape) == 2 and qtype[t.name] in KEPT_TYPES}
    notes = {}  # GGUF type -> tensor names dequantized because of it
    for t, _, _, _ in plan:
        if qtype[t.name] not in KEPT_TYPES and qtype[t.name] not in _FLOAT_TYPES:
            notes.setdefault(qtype[t.name], []).append(t.name)
    for kind, names in notes.items():
        print(f"note: {path}: {len(names)} tensor(s) of type {kind} (e.g. {names[0]!r}) cannot be kept as blocks "
              f"(only {', '.join(KEPT_TYPES)}): dequantized to float32", file=sys.stderr)
    layers = {n.split(".")[1] for n in qtype if n.startswith("blk.")}
    for layer in sorted(layers, key=int):
        for group in _FUSED:
            names = [f"blk.{layer}.{g}.weight" for g in group]
            kinds = {QUANT_TYPES[kept[n]][0] if n in kept else "float" for n in names if n in qtype}
            if len(kinds) > 1:
                mixed = ", ".join(f"{n} {qtype[n]}" for n in names if n in qtype)
                print(f"note: {path}: {mixed}: the runtime reads these as one matrix, so they must share a kind; "
                      f"all dequantized to float32", file=sys.stderr)
                for n in names:
                    kept.pop(n, None)
    if not kept:
        found = ", ".join(sorted({qtype[t.name] for t, _, shape, _ in plan if len(shape) == 2}))
        raise UserError(f"{path}: --keep-quant: no weight can be kept as blocks (only {', '.join(KEPT_TYPES)} are; "
                        f"this file's matrices are {found}); import it without --keep-quant")
    return {hf: kept[t.name] for t, hf, _, _ in plan if t.name in kept}


def _write_safetensors(out: Path, plan: list, path: Path, *, show_progress: bool, metadata: dict,
                       kept: dict[str, str]) -> None:
    """Stream the tensors into one safetensors file, one tensor in memory at a time: float32, or the
    QuantWeight parts of those in ``kept`` (HF name -> stored type) with their metadata entry."""
    from tqdm.auto import tqdm

    from model.weights import QUANT_META_KEY, QUANT_TYPES, quant_metadata

    def entries(hf, shape):  # (safetensors name, dtype, shape) in the order they are written
        if hf not in kept:
            return [(hf, "F32", list(shape))]
        kind, group = QUANT_TYPES[kept[hf]]
        (N, K), scales = shape, [shape[0], shape[1] // group]
        return [(hf + ".qdata", "I8" if kind == "int8" else "U8", [N, K if kind == "int8" else K // 2]),
                (hf + ".qscale", "F16", scales)] + ([(hf + ".qoffset", "F16", scales)] if kind == "int4" else [])

    if kept:
        metadata = {**metadata, QUANT_META_KEY: quant_metadata(kept)}
    header = {"__metadata__": metadata}
    offset = 0
    sizes = {"F32": 4, "F16": 2, "I8": 1, "U8": 1}
    for _, hf, shape, _ in plan:
        for name, dtype, part_shape in entries(hf, shape):
            nbytes = sizes[dtype] * math.prod(part_shape)
            header[name] = {"dtype": dtype, "shape": part_shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned

    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        with tqdm(plan, desc=f"importing {path.name}", unit="tensor", disable=not show_progress, file=sys.stderr) as bar:
            for t, hf, shape, heads in bar:
                if hf in kept:
                    w = _gguf_blocks(t, shape, path)
                    arrays = [p.numpy() for p in (w.data, w.scale, w.offset) if p is not None]
                else:
                    arrays = [_dequantize(t, shape, path)]
                for a in arrays:
                    if heads is not None:
                        a = _unpermute_rows(a, heads)
                    f.write(np.ascontiguousarray(a).tobytes())


def _write_tokenizer(gguf_path: Path, meta: dict, config: dict, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    n_tokens = meta.get("tokenizer.ggml.tokens", 0)  # _metadata keeps the count
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            i = _meta_int(meta, f"tokenizer.ggml.{key}", gguf_path, lo=0)
            if i >= n_tokens:
                raise UserError(f"{gguf_path}: GGUF metadata tokenizer.ggml.{key} is {i}, beyond the {n_tokens} tokens "
                                f"of tokenizer.ggml.tokens")
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
        return tok.convert_ids_to_tokens(i) if i is not None else None

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


def import_gguf(gguf_path, out_dir, *, show_progress: bool = True, overwrite: bool = False,
                keep_quant: bool = False) -> Path:
    """Convert the llama GGUF at `gguf_path` into a checkpoint directory `out_dir`; return it.

    `keep_quant`: keep Q8_0 / Q4_0 / Q4_1 matrices as blocks (``CheckpointReader.read_quant`` reads
    them); otherwise everything is dequantized to float32.

    Written through ``model.atomic.install_dir``: `out_dir` must be missing or empty unless
    `overwrite` (then it is replaced once the new checkpoint is complete), and may not be, contain
    or sit inside the GGUF. Errors about the input raise `UserError` naming the file.
    """
    from model.atomic import install_dir

    gguf_path = Path(gguf_path).expanduser()
    with install_dir(out_dir, replace=overwrite, inputs=[gguf_path]) as tmp:
        reader = _open_reader(gguf_path)
        meta = _metadata(reader)
        config = _build_config(reader, meta, gguf_path)
        plan = _tensor_plan(reader, config, gguf_path)
        source = {
            "format": "pt",
            "source": gguf_path.name,
            "source_file_type": str(meta.get("general.file_type", "")),
            "source_name": str(meta.get("general.name", "")),
        }
        kept = _kept_tensors(plan, gguf_path) if keep_quant else {}
        _write_safetensors(tmp / "model.safetensors", plan, gguf_path, show_progress=show_progress, metadata=source,
                           kept=kept)
        _write_tokenizer(gguf_path, meta, config, tmp)
        _write_json(tmp / "config.json", config)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        _write_json(tmp / "generation_config.json", generation)
        del reader, plan  # release the memory map before renaming
    return Path(out_dir).expanduser().resolve()
