"""Arbitrary JSON in any field of a checkpoint's files or a plan: the loader loads or raises UserError.

Each family starts from a document that loads (stories260K's config.json, its Nemotron-NAS and
LLM-Drop exports, a sharded export's index, tokenizer_config.json, the two plan forms), then hypothesis
sets one field anywhere in it (nested ones included, or the whole document) to an arbitrary JSON
value (NaN, infinities, huge and negative integers, strings, lists, objects, null) or deletes it.
Any exception other than ``UserError`` fails the test.
"""

import json
import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.config import load_config
from model.errors import UserError
from model.tokenizer import Tokenizer
from model.weights import CheckpointReader
from kernels.rotary import rope_inv_freq, rope_tables
from runtime.plan import load_plan, resolve_plan
from runtime.schedule import compile_plan, needed_tensors
from bench.hf_reference import STORIES
from tools.export import export

FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

SPECIAL_NUMBERS = [0, 1, -1, 2, 3, 5, 8, 172, 256, 512, 2 ** 31, 2 ** 63, 10 ** 30, -(2 ** 40),
                   0.0, -0.0, 0.5, 1e-300, 1e300, math.nan, math.inf, -math.inf]
scalars = (st.none() | st.booleans() | st.sampled_from(SPECIAL_NUMBERS) | st.integers()
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(["", "llama3", "default", "silu", "..", "/etc/passwd", "../model.safetensors",
                              "model.safetensors", "<s>", "{{ messages[0]['content'] }}", "{% if %}"]))
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=6)


def paths(doc, prefix=()):
    """Every place in a JSON document: () for the whole document, then each key / index, depth first."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, prefix + (i,))


def mutated(doc, path, value, delete):
    """A deep copy of ``doc`` with ``path`` set to ``value`` (or removed)."""
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        if isinstance(parent, list) or path[-1] in parent:
            parent.pop(path[-1])  # a dict key or a list item
    else:
        parent[path[-1]] = value
    return doc


def mutations(doc, extra_paths=()):
    """(path, value, delete) draws: any existing place, or an optional field the loader reads."""
    places = list(dict.fromkeys(list(paths(doc)) + list(extra_paths)))
    return st.tuples(st.sampled_from(places), json_values, st.booleans())


def write(path, doc):
    path.write_text(json.dumps(doc, allow_nan=True))


def load_everything(d):
    """What ``runtime.load`` reads from a checkpoint directory, short of building the engine."""
    config = load_config(d)
    plan = load_plan(config.carried_plan, config.num_layers)
    reader = CheckpointReader(d)
    for name, shape in needed_tensors(compile_plan(plan, config).steps, config).items():
        reader.read(name, shape, torch.float32, "cpu")
    floats = (config.rms_norm_eps, config.rope_theta, *(config.rope_scaling or {}).values())
    assert all(math.isfinite(x) for x in floats if isinstance(x, float)), config
    assert torch.isfinite(rope_tables(rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling), 4)[0]).all()
    tok = Tokenizer(d, config.bos_token_id, config.eos_token_ids)
    tok.decode(tok.encode("Once upon a time"))
    if tok.chat_template:
        tok.encode_chat("Hi")


def loads_or_user_error(d):
    try:
        load_everything(d)
    except UserError:
        pass


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoint directories: plain stories260K copy, Nemotron-NAS and LLM-Drop exports, a sharded export."""
    root = tmp_path_factory.mktemp("fuzz")
    plain = root / "plain"
    shutil.copytree(STORIES, plain)
    for p in plain.iterdir():
        p.chmod(0o644)
    export(str(STORIES), "attn66", "nemotron-nas", root / "nas", progress=False)
    export(str(STORIES), {"version": 1, "drop": {"attention": [0, 2], "mlp": [1], "block": [4]}}, "llm-drop",
           root / "drop", progress=False)
    export(str(STORIES), "mlp66", "llm-drop", root / "sharded", shard_size="200KB", progress=False)
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    for d in (plain, root / "nas", root / "drop", root / "sharded"):
        load_everything(d)  # every starting point loads
    return {"plain": plain, "nas": root / "nas", "drop": root / "drop", "sharded": root / "sharded"}


def fuzz_file(d, name, extra_paths=()):
    """A hypothesis test body over one JSON file of checkpoint ``d``, restoring the file afterwards."""
    path = d / name
    original = json.loads(path.read_text())

    @FUZZ
    @given(mutations(original, extra_paths))
    def run(change):
        try:
            write(path, mutated(original, *change))
            loads_or_user_error(d)
        finally:
            write(path, original)

    run()


CONFIG_EXTRA = [(k,) for k in ("rope_parameters", "rope_scaling", "dtype", "sliding_window", "sublayer_plan",
                                "drop_attn_list", "drop_mlp_list", "block_configs")]
NAS_EXTRA = CONFIG_EXTRA + [("block_configs", i, part, key) for i in range(5) for part, key in (
    ("ffn", "ffn_mult"), ("ffn", "hidden_act"), ("ffn", "moe"), ("attention", "window_length"))]


def test_config_fields(ckpts):
    raw = json.loads((ckpts["plain"] / "config.json").read_text())
    raw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 256}
    write(ckpts["plain"] / "config.json", raw)
    load_everything(ckpts["plain"])
    fuzz_file(ckpts["plain"], "config.json", CONFIG_EXTRA)


def test_nemotron_nas_fields(ckpts):
    fuzz_file(ckpts["nas"], "config.json", NAS_EXTRA)


def test_llm_drop_fields(ckpts):
    fuzz_file(ckpts["drop"], "config.json", CONFIG_EXTRA)


def test_sharded_index_fields(ckpts):
    fuzz_file(ckpts["sharded"], "model.safetensors.index.json")


def test_tokenizer_config_fields(ckpts):
    d = ckpts["plain"]
    raw = json.loads((d / "tokenizer_config.json").read_text())
    raw |= {"pad_token": {"content": "<unk>"}, "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    write(d / "tokenizer_config.json", raw)
    load_everything(d)
    fuzz_file(d, "tokenizer_config.json")


@FUZZ
@given(st.sampled_from([{"version": 1, "name": "r", "description": "d",
                         "rule": {"kind": "attention", "fraction": 0.25, "keep_last": True}},
                        {"version": 1, "name": "d", "drop": {"attention": [0, 3], "mlp": [1], "block": [4]},
                         "source": {"tool": "x"}}]).flatmap(lambda doc: st.tuples(st.just(doc), mutations(doc))))
def test_plan_fields(case):
    doc, change = case
    try:
        resolve_plan(mutated(doc, *change), 5)
    except UserError:
        pass


def test_hostile_examples_named(ckpts, tmp_path):
    """A few of the family, with the field named in the message."""
    d = tmp_path / "c"
    shutil.copytree(ckpts["sharded"], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    for shard in ("/etc/passwd", "../c/model-00001-of-00006.safetensors", ".."):
        write(d / "model.safetensors.index.json", dict(index, weight_map=dict(index["weight_map"], **{name: shard})))
        with pytest.raises(UserError, match=f"weight_map.{name}' must be a plain file name"):
            CheckpointReader(d)
    write(d / "model.safetensors.index.json", dict(index, weight_map=[1, 2]))
    with pytest.raises(UserError, match="field 'weight_map' must be a non-empty object"):
        CheckpointReader(d)
    nas = json.loads((ckpts["nas"] / "config.json").read_text())
    for mult, word in ((math.nan, "finite"), (1e30, "finite number in"), (-1, r"\(0, 1000\]")):
        cfg = json.loads(json.dumps(nas))
        cfg["block_configs"][0]["ffn"]["ffn_mult"] = mult
        (tmp_path / "n").mkdir(exist_ok=True)
        write(tmp_path / "n" / "config.json", cfg)
        with pytest.raises(UserError, match=rf"n/config.json: field 'block_configs\[0\]\.ffn\.ffn_mult'.*{word}"):
            load_config(tmp_path / "n")
    plain = json.loads((ckpts["plain"] / "config.json").read_text())
    for field, value in (("rms_norm_eps", math.nan), ("rope_theta", math.inf), ("vocab_size", 10 ** 12),
                         ("num_hidden_layers", -3), ("hidden_size", "64"), ("tie_word_embeddings", 1),
                         ("eos_token_id", [2, "x"]), ("bos_token_id", 512), ("architectures", [["x"]]),
                         ("rope_parameters", [1]), ("attention_bias", "no")):
        write(tmp_path / "n" / "config.json", dict(plain, **{field: value}))
        with pytest.raises(UserError, match=f"n/config.json: field '{field}'"):
            load_config(tmp_path / "n")


def test_huge_plan_values_fail_fast_with_short_messages():
    import time

    start = time.monotonic()
    with pytest.raises(UserError, match=r"lists layer\(s\) \[0\] more than once"):
        resolve_plan({"version": 1, "drop": {"attention": [0] * 200_000}}, 5)
    with pytest.raises(UserError) as e:
        resolve_plan({"version": 1, "rule": {"kind": ["x"] * 100_000, "fraction": 0.5}}, 5)
    assert len(str(e.value)) < 300 and time.monotonic() - start < 2


@pytest.mark.parametrize("text", ["[" * 100_000, '{"hidden_size": 1' + "0" * 5000 + "}", "\xff\xfe{}", ""])
def test_unparseable_json_files_named(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match="config.json: not readable JSON"):
        load_config(tmp_path)
