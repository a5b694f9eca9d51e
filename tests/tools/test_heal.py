"""Healing by distillation on stories260K: the student is the runtime's plan, training lowers the loss and
the held-out KL, the result loads as a checkpoint with the same logits, a stopped run resumes, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

import runtime
from bench.hf_reference import STORIES
from model.errors import UserError
from runtime.plan import load_plan
from tools import distill
from tools.heal import heal, main, parser
from tools import heal_data
from tools.heal_data import check_training_file, read_prompts

TINYSTORIES = STORIES.parents[1] / "data" / "tinystories" / "validation_head.txt"
IDS = torch.tensor([[1, 403, 407, 261, 378, 285, 280, 13, 306, 352, 306, 260, 377, 295, 432, 13],
                    [1, 65, 66, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312]])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine more threads make these small steps far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_text(tmp_path_factory):
    """The first 80% by bytes of TinyStories validation_head (the part that may train)."""
    data = TINYSTORIES.read_bytes()
    path = tmp_path_factory.mktemp("text") / "tinystories_train.txt"
    path.write_bytes(data[:int(len(data) * 0.8)])
    return path


def args_for(out, train_text, *extra):
    return parser().parse_args([
        "--model", str(STORIES), "--plan", "attn66", "--out", str(out), "--train-text", str(train_text),
        "--seq-len", "64", "--batch-size", "8", "--lr", "5e-4", "--steps", "12", "--eval-every", "6",
        "--save-every", "4", "--eval-text", str(TINYSTORIES), "--eval-start-fraction", "0.8",
        "--eval-samples", "8", "--no-autocast", "--no-progress", *extra])


@pytest.mark.parametrize("plan", ["attn66", {"version": 1, "drop": {"attention": [0, 3], "mlp": [1], "block": [4]}}])
def test_student_equals_runtime_before_training(plan):
    p = load_plan(plan, 5)
    student = distill.remove_sublayers(distill.load_hf(STORIES), p).eval()
    names = {n for n, _ in student.named_parameters()}
    for layer in p.drop_attention:
        assert not any(n.startswith(f"model.layers.{layer}.self_attn") or n.startswith(f"model.layers.{layer}.input_")
                       for n in names)
    with torch.no_grad():
        ours = student(IDS).logits
    ref = runtime.load(STORIES, plan=plan, dtype="float32", compile=False, show_progress=False).logits(IDS)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.fixture(scope="module")
def healed(tmp_path_factory, train_text):
    out = tmp_path_factory.mktemp("heal") / "healed"
    state = heal(args_for(out, train_text))
    return out, state


def test_training_lowers_loss_and_held_out_kl(healed):
    out, state = healed
    losses, hist = state["losses"], state["history"]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert hist[0]["step"] == 0 and hist[-1]["step"] == 12
    assert hist[-1]["held_out_kl"] < hist[0]["held_out_kl"]
    log = json.loads((out / "heal_log.json").read_text())
    assert log["tokens"] == 12 * 8 * 64 and log["held_out_kl"] == hist


def test_result_loads_with_the_students_logits(healed):
    out, _ = healed
    engine = runtime.load(out, dtype="float32", compile=False, show_progress=False)  # no --plan: it is carried
    assert engine.plan.drop_attention == {3, 4} and not engine.plan.drop_mlp
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas"
    tensors = load_file(str(out / "model.safetensors"))
    assert not any(".layers.3.self_attn" in n or ".layers.4.self_attn" in n for n in tensors)
    # the same weights in the HF student give the same logits
    student = distill.remove_sublayers(distill.load_hf(STORIES), load_plan("attn66", 5)).eval()
    student.load_state_dict(tensors, strict=False)
    with torch.no_grad():
        ref = student(IDS).logits
    ours = engine.logits(IDS)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4
    original = runtime.load(STORIES, plan="attn66", dtype="float32", compile=False, show_progress=False).logits(IDS)
    assert not torch.allclose(ours, original)  # training changed something


def test_stopped_run_resumes_to_the_same_weights(healed, tmp_path, train_text):
    out = tmp_path / "stopped"
    heal(args_for(out, train_text, "--stop-after", "4"))
    assert (out / ".ckpt" / "step-4" / "state.json").is_file() and not (out / "config.json").exists()
    heal(args_for(out, train_text, "--resume"))
    a, b = load_file(str(out / "model.safetensors")), load_file(str(healed[0] / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_lora_merges_into_kept_weights(tmp_path, train_text):
    out = tmp_path / "lora"
    state = heal(args_for(out, train_text, "--train", "lora", "--rank", "4", "--steps", "4", "--lr", "1e-2"))
    assert state["history"][-1]["held_out_kl"] < state["history"][0]["held_out_kl"]
    tensors = load_file(str(out / "model.safetensors"))
    assert not any("lora" in n for n in tensors)
    runtime.load(out, show_progress=False)


def test_residual_mse_term(tmp_path, train_text):
    args = args_for(tmp_path / "mse", train_text, "--steps", "2", "--mse-weight", "1.0")
    state = heal(args)
    assert all(l == l and l > 0 for l in state["losses"])  # finite, and the MSE adds to the KL
    assert distill.boundary_layers(load_plan("attn66", 5)) == [4, 5]


@pytest.mark.parametrize("extra, message", [
    (["--train-text", str(TINYSTORIES)], "is the evaluation file ./tinystories/validation_head.txt"),
    (["--train", "heads"], "--train: expected one of norms, lora, all"),
    (["--plan", "full"], "drops nothing"),
    (["--steps", "0"], "--steps: expected a positive integer"),
])
def test_bad_input(tmp_path, capsys, train_text, extra, message):
    argv = ["--model", str(STORIES), "--plan", "attn66", "--out", str(tmp_path / "o"), "--train-text", str(train_text),
            "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_existing_out_needs_resume(tmp_path, capsys, train_text):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    assert main(["--model", str(STORIES), "--plan", "attn66", "--out", str(tmp_path / "o"),
                 "--train-text", str(train_text), "--no-progress"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_guard_and_prompts(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        check_training_file(tmp_path / "missing.txt")
    prompts = read_prompts()
    assert len(prompts) >= 500 and len(set(prompts)) == len(prompts)
    assert any("\n" in p for p in prompts)  # escaped newlines (code prompts) come back


def test_sample_plan_meets_every_variant():
    prompts = [f"p{i}" for i in range(5)]
    seen = {heal_data.sample_plan(i, prompts, (0.7, 1.0), (False, True)) for i in range(4 * len(prompts))}
    assert seen == {(p, t, c) for p in range(5) for t in (0.7, 1.0) for c in (False, True)}


def test_self_generate_caches_shards_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBLAYER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(heal_data, "SHARD", 4)
    load = runtime.load
    monkeypatch.setattr(runtime, "load", lambda *a, **k: load(*a, **dict(k, dtype="float32", compile=False)))
    ids = heal_data.self_generate(STORIES, 6, max_new_tokens=12, slots=3, progress=False)
    assert len(ids) == 6 and all(len(s) > 1 for s in ids)
    shards = sorted((tmp_path / "cache" / "heal-data").glob("*/shard-*.jsonl"))
    assert [p.name for p in shards] == ["shard-00000.jsonl", "shard-00001.jsonl"]
    rows = [json.loads(line) for line in shards[0].read_text().splitlines()]
    assert [r["sample"] for r in rows] == [0, 1, 2, 3] and [r["temperature"] for r in rows] == [0.7, 1.0, 0.7, 1.0]
    assert not any(r["chat"] for r in rows)  # stories260K has no chat template
    first = shards[0].stat().st_mtime_ns
    shards[1].unlink()  # as if killed while shard 1 was in flight: only it is generated again
    again = heal_data.self_generate(STORIES, 6, max_new_tokens=12, slots=2, progress=False)
    assert again == ids and shards[0].stat().st_mtime_ns == first
