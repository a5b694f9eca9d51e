"""Quantized weights in the runtime (``runtime.load(..., quant=...)``): each projection path (the eager
reference, the compiled CPU multiply-reduce) equals dequantize-then-matmul; a quantized engine's decode
steps equal those of the same engine with its weights replaced by their dequantized floats (its own
reference) within 1e-4 in float32, greedy tokens identical; plans compose (dropped weights never
read); the byte counts are the tensors'; stored-quantized checkpoints run as stored; bad input."""

import copy
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import runtime
from bench.hf_reference import STORIES, make_tiny_llama
from model.errors import UserError
from model.quant import QuantWeight, dequantize, quantize
from kernels import quant_gemv_cpu
from runtime import step
from runtime.engine import AttentionWeights

PROMPT = [1, 403, 407, 261, 378]
STEPS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tied GQA Llama whose every input dimension is a multiple of 64 (int4 groups 32 and 64)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", 64, 3, 4, 2, 128, True)


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_untied") / "m", 64, 2, 4, 4, 192, False, seed=1)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def dequantized_twin(engine):
    """The same engine with every QuantWeight replaced by its float32 dequantization (nothing re-read)."""
    def f(w):
        return dequantize(w) if isinstance(w, QuantWeight) else w

    twin = copy.copy(engine)
    twin.quant = None
    twin.embed, twin.lm_head = f(engine.embed), f(engine.lm_head)
    twin.layers = [replace(w, qkv=f(w.qkv), o=f(w.o)) if isinstance(w, AttentionWeights)
                   else replace(w, gate_up=f(w.gate_up), down=f(w.down)) for w in engine.layers]
    twin._cache = twin._graph = None
    return twin


def decode_both(engine, twin, steps=STEPS):
    """Prefill PROMPT and decode ``steps`` greedy tokens on both; returns per-step rel errors, and the
    greedy tokens of each."""
    errs, tokens = [], ([], [])
    T = len(PROMPT)
    caches = [e.new_cache(1, T + steps + 1) for e in (engine, twin)]
    kv0 = torch.zeros(1, dtype=torch.int32)
    logits = [e.forward(torch.tensor([PROMPT]), c, 0, kv0, torch.arange(T)[None], last_only=True)
              for e, c in zip((engine, twin), caches)]
    for i in range(steps):
        errs.append(rel(logits[0][:, -1], logits[1][:, -1]))
        nxt = [lg[:, -1].argmax(-1, keepdim=True) for lg in logits]
        tokens[0].append(int(nxt[0])), tokens[1].append(int(nxt[1]))
        index = torch.tensor([T + i])
        logits = [e.decode_step(nxt[0], c, index, kv0) for e, c in zip((engine, twin), caches)]
    return errs, tokens


def loaded_bytes(engine):
    def n(w):
        return w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size()

    tensors = [engine.embed, engine.final_norm] + ([] if engine.lm_head is engine.embed else [engine.lm_head])
    tensors += [t for w in engine.layers for t in vars(w).values()]
    return sum(n(t) for t in tensors)


# ---- the projection paths --------------------------------------------------------------------------

CASES = [("int8", None, True), ("int8", 32, True), ("int4", 32, True), ("int4", 64, True), ("int4", 64, False)]


@pytest.fixture(params=["kernel", "loop"])
def one_row_path(request, monkeypatch):
    """A one-row quantized projection through the C++ kernel (where this CPU builds it), or through
    inductor's fused loop (the fallback elsewhere)."""
    if request.param == "kernel":
        if not quant_gemv_cpu.available():
            pytest.skip("the C++ kernel does not build on this CPU")
    else:
        monkeypatch.setattr(quant_gemv_cpu, "_available", False)
    torch._dynamo.reset()  # the answer is a constant to a compiled step: compile again for each path
    yield request.param
    torch._dynamo.reset()


@pytest.mark.parametrize("kind,group,offset", CASES)
def test_multiply_reduce_equals_dequantize_then_matmul(kind, group, offset, one_row_path):
    g = torch.Generator().manual_seed(0)
    w = quantize(torch.randn(96, 192, generator=g) * 0.05, kind, group)
    if not offset:  # int4 without offset (the format allows it)
        w = w._replace(offset=None)
    x = torch.randn(1, 1, 192, generator=g)
    ref = x @ dequantize(w).T
    assert rel(step.quant_multiply_reduce(x.reshape(-1), w), ref.reshape(-1)) < 1e-6
    assert rel(step.multiply_reduce(x, w), ref) < 1e-6 and step.multiply_reduce(x, w).shape == (1, 1, 96)
    assert rel(step.linear(x, w), ref) < 1e-6
    rows = torch.randn(3, 5, 192, generator=g)  # prefill and batches: dequantize, then a GEMM
    assert rel(step.multiply_reduce(rows, w), rows @ dequantize(w).T) < 1e-6
    xb = x.bfloat16()  # bf16 activations: against the float32 product of the same bf16 inputs
    out = step.multiply_reduce(xb, w)
    assert out.dtype == torch.bfloat16 and rel(out.float(), xb.float() @ dequantize(w).T) < 1e-2


@pytest.mark.parametrize("kind,group", [("int8", None), ("int4", 32)])
def test_compiled_multiply_reduce_equals_the_reference(kind, group, one_row_path):
    g = torch.Generator().manual_seed(1)
    w = quantize(torch.randn(80, 128, generator=g) * 0.05, kind, group)
    x = torch.randn(1, 1, 128, generator=g)
    compiled = torch.compile(step.multiply_reduce, fullgraph=True, dynamic=False)
    assert rel(compiled(x, w), x @ dequantize(w).T) < 1e-6


def test_quantized_embedding_dequantizes_the_rows_it_reads():
    w = quantize(torch.randn(50, 64) * 0.1, "int4", 32)
    ids = torch.tensor([[4, 9, 4]])
    out = step.embedding(ids, w, torch.bfloat16)
    assert out.shape == (1, 3, 64) and out.dtype == torch.bfloat16
    assert torch.equal(out, dequantize(w, torch.bfloat16)[ids[0]][None])


# ---- engines against their dequantized twins ---------------------------------------------------------

@pytest.mark.parametrize("model,quant,group,head,compile", [
    ("stories", "int8", None, True, True),      # per channel; stories260K's MLP input is 172, not a multiple of 32
    ("tiny", "int4", 32, True, True),           # tied: one quantized table for embedding and head
    ("stories", "int8", 4, False, False),
    ("tiny_untied", "int4", 64, True, False),
    ("tiny_untied", "int8", None, False, False),
])
def test_decode_matches_the_dequantized_model(model, quant, group, head, compile, request):
    path = STORIES if model == "stories" else request.getfixturevalue(model)
    engine = runtime.load(str(path), dtype="float32", device="cpu", compile=compile, quant=quant,
                          group_size=group, quant_head=head)
    assert engine.decode_mode == ("compiled" if compile else "eager")
    assert isinstance(engine.layers[0].qkv, QuantWeight) and engine.layers[0].qkv.kind == quant
    assert isinstance(engine.lm_head, QuantWeight) == head and isinstance(engine.embed, QuantWeight) == head
    if engine.config.tie_word_embeddings:
        assert engine.lm_head is engine.embed
    errs, (toks, ref_toks) = decode_both(engine, dequantized_twin(engine))
    assert max(errs) < 1e-4, errs
    assert toks == ref_toks
    assert engine.weight_bytes == loaded_bytes(engine)
    assert engine.step_bytes(10) == engine.weight_bytes + engine.kv_bytes(10) - (
        0 if engine.config.tie_word_embeddings else loaded_bytes_of(engine.embed))


def loaded_bytes_of(w):
    return w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size()


def test_compiled_quantized_step_compiles_once_not_per_layer(tiny):
    """Every layer's QuantWeights share one compiled attention / MLP / head step: no recompile after
    the first decode step, and at most one graph per step function in it."""
    from torch._dynamo.utils import counters

    engine = runtime.load(str(tiny), dtype="float32", device="cpu", quant="int4", group_size=64)
    cache = engine.new_cache(1, 16)
    kv0 = torch.zeros(1, dtype=torch.int32)
    engine.forward(torch.tensor([PROMPT]), cache, 0, kv0, torch.arange(5)[None])
    graphs = counters["stats"]["unique_graphs"]
    engine.decode_step(torch.tensor([[5]]), cache, torch.tensor([5]), kv0)
    assert counters["stats"]["unique_graphs"] - graphs <= 3
    graphs = counters["stats"]["unique_graphs"]
    for i in range(6, 10):
        engine.decode_step(torch.tensor([[i]]), cache, torch.tensor([i]), kv0)
    assert counters["stats"]["unique_graphs"] == graphs


def test_plans_compose_dropped_weights_never_read(tiny):
    plan = {"version": 1, "drop": {"attention": [0, 2], "mlp": [1]}}
    engine = runtime.load(str(tiny), plan=plan, dtype="float32", device="cpu", compile=False, quant="int8")
    read = set(engine.names_read)
    for dropped in ("layers.0.self_attn", "layers.2.self_attn", "layers.1.mlp", "layers.0.input_layernorm"):
        assert not any(dropped in n for n in read), dropped
    assert "model.layers.1.self_attn.q_proj.weight" in read
    full = runtime.load(str(tiny), dtype="float32", device="cpu", compile=False, quant="int8")
    assert engine.weight_bytes == loaded_bytes(engine) < full.weight_bytes == engine.full_weight_bytes
    errs, (toks, ref_toks) = decode_both(engine, dequantized_twin(engine), steps=3)
    assert max(errs) < 1e-4 and toks == ref_toks


def test_bytes_shrink_as_expected(tiny_untied):
    """int8 per channel: 1 byte per weight + a float16 scale per row; int4 g64: half a byte + 4 bytes per group."""
    f32 = runtime.load(str(tiny_untied), dtype="float32", device="cpu", compile=False)
    i8 = runtime.load(str(tiny_untied), dtype="float32", device="cpu", compile=False, quant="int8")
    c = f32.config
    proj = sum(w.numel() for layer in f32.layers for name, w in vars(layer).items() if name != "norm")
    rows = sum(w.shape[0] for layer in f32.layers for name, w in vars(layer).items() if name != "norm")
    assert f32.weight_bytes - i8.weight_bytes == proj * 4 - (proj + 2 * rows)
    i4 = runtime.load(str(tiny_untied), dtype="bfloat16", device="cpu", compile=False, quant="int4", quant_head=True)
    embed = c.vocab_size * c.hidden_size
    assert i4.weight_bytes == loaded_bytes(i4)
    assert i4.step_bytes(8) == i4.weight_bytes - (embed // 2 + embed // 64 * 4) + i4.kv_bytes(8)


# ---- checkpoints that store quantized weights -------------------------------------------------------

def stored_copy(src, dst):
    """``src`` with every projection stored as q8_0 blocks (model.weights' stored-quantized format)."""
    from model.weights import quant_metadata, quant_parts

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors, types = {}, {}
    for name, t in load_file(src / "model.safetensors").items():
        if name.endswith("_proj.weight"):
            tensors |= quant_parts(name, quantize(t, "int8", 32))
            types[name] = "q8_0"
        else:
            tensors[name] = t
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt", "quant": quant_metadata(types)})
    return dst


def test_stored_quantized_checkpoint_runs_as_stored_and_refuses_quant(tiny, tmp_path):
    path = stored_copy(tiny, tmp_path / "q8")
    engine = runtime.load(str(path), dtype="float32", device="cpu", compile=False)
    w = engine.layers[0].qkv
    assert isinstance(w, QuantWeight) and w.kind == "int8" and w.group_size == 32
    assert not isinstance(engine.embed, QuantWeight)
    assert "q8_0" in engine.quant.describe() and engine.weight_bytes == loaded_bytes(engine)
    errs, (toks, ref_toks) = decode_both(engine, dequantized_twin(engine), steps=3)
    assert max(errs) < 1e-4 and toks == ref_toks
    for kw in ({"quant": "int8"}, {"quant": "int4", "quant_head": True}):
        with pytest.raises(UserError, match="--quant: .* is already quantized .*q8_0.*float checkpoints only"):
            runtime.load(str(path), dtype="float32", device="cpu", compile=False, **kw)


# ---- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,message", [
    ({"quant": "int2"}, "--quant: expected none, int8 or int4; got 'int2'"),
    ({"quant": "int4"}, "--group-size: 64 does not divide the input dimension 172 of model.layers.0.mlp.down_proj"),
    ({"quant": "int4", "group_size": 16}, "--group-size: int4 groups are whole blocks of 32"),
    ({"quant": "int8", "group_size": 5}, "--group-size: 5 does not divide the input dimension 64"),
    ({"group_size": 32}, "--group-size: only with --quant"),
])
def test_bad_quant_arguments_are_clear_errors(kw, message):
    with pytest.raises(UserError) as e:
        runtime.load(str(STORIES), dtype="float32", device="cpu", compile=False, **kw)
    assert message in str(e.value)


def test_generate_cli_reports_the_quantization_and_refuses_bad_values(capsys):
    from runtime import generate as cli

    rc = cli.main(["--model", str(STORIES), "--prompt", "Once", "--max-new-tokens", "3", "--no-compile",
                   "--quant", "int8", "--quant-head"])
    err = capsys.readouterr().err
    assert rc == 0 and "int8, symmetric, one float16 scale per output channel; embedding and LM head quantized" in err
    rc = cli.main(["--model", str(STORIES), "--prompt", "Once", "--quant", "int4", "--group-size", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and "--group-size: 32 does not divide the input dimension 172" in err and "Traceback" not in err


def test_lm_eval_model_args_quantize():
    from lm_eval.api.registry import get_model

    import tools.lm_eval_adapter  # noqa: F401  (registers "sublayer")

    cls = get_model("sublayer")
    lm = cls.create_from_arg_string(f"pretrained={STORIES},dtype=float32,compile=false,quant=int8,group_size=4,"
                                    f"quant_head=true", {"batch_size": 1, "device": "cpu"})
    q = lm.engine.quant
    assert (q.kind, q.group_size, q.head) == ("int8", 4, True) and isinstance(lm.engine.lm_head, QuantWeight)
    for bad, message in (("quant=int3", "--quant"), ("quant=int8,group_size=x", "group_size"),
                         ("quant=int8,quant_head=maybe", "quant_head")):
        with pytest.raises(UserError, match=message):
            cls.create_from_arg_string(f"pretrained={STORIES},{bad}", {"batch_size": 1, "device": "cpu"})


def test_serve_takes_the_quant_flags(capsys):
    from runtime import serve

    args = serve.parse_args(["--model", str(STORIES), "--quant", "int8", "--group-size", "4", "--quant-head",
                             "--no-compile"])
    engine = serve.load_engine(args)
    assert (engine.quant.kind, engine.quant.group_size, engine.quant.head) == ("int8", 4, True)
    assert serve.main(["--model", str(STORIES), "--quant", "int4"]) == 2
    err = capsys.readouterr().err
    assert "--group-size: 64 does not divide the input dimension 172" in err and "Traceback" not in err


def test_quantized_load_hands_freed_float_temporaries_back(monkeypatch):
    """glibc keeps the float copies quantization frees unless asked (SmolLM2 int8: 962 vs 538 MiB resident)."""
    from runtime import engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "release_freed_memory", lambda: calls.append(1))
    runtime.load(str(STORIES), dtype="float32", device="cpu", compile=False)
    assert calls == []
    runtime.load(str(STORIES), dtype="float32", device="cpu", compile=False, quant="int8")
    assert calls == [1]
