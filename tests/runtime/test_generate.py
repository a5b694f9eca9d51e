"""The generate CLI: streamed text on stdout, labelled accounting on stderr, clear errors for bad input."""

import json
import re
import shutil
import subprocess
import sys

import pytest

import runtime
from bench.hf_reference import STORIES


def generate(*args):
    return subprocess.run([sys.executable, "-m", "runtime.generate", *args], capture_output=True, text=True)


def test_streams_greedy_text_and_reports_on_stderr():
    r = generate("--model", str(STORIES), "--plan", "attn90", "--prompt", "Once upon a time", "--max-new-tokens", "20")
    assert r.returncode == 0, r.stderr
    engine = runtime.load(str(STORIES), plan="attn90", dtype="float32", device="cpu")
    expected = engine.generate("Once upon a time", max_new_tokens=20).texts[0]
    assert r.stdout == "Once upon a time" + expected + "\n"
    for label in (r"plan: attn90: attention dropped in 1/5 layers \(4\)", r"weights: [\d.]+ MiB \(full [\d.]+ MiB\)",
                  r"KV cache: [\d.]+ MiB for \d+ positions \(full [\d.]+ MiB\)",
                  r"\ncompile: [\d.]+ s \(the first decode step",
                  r"\ndecode: [\d.]+ ms/token \([\d.]+ tokens/s, [\d.]+ GB/s, 18 steps after the first"):
        assert re.search(label, r.stderr), label


def test_no_compile_gives_the_same_text():
    """--no-compile decodes on the eager reference: same greedy text as the compiled default."""
    args = ["--model", str(STORIES), "--plan", "attn66", "--prompt", "Lily and Ben", "--max-new-tokens", "16"]
    a, b = generate(*args), generate(*args, "--no-compile")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and len(a.stdout) > len("Lily and Ben")


def test_prompt_file_is_a_batch(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("Once upon a time\nTom had a red ball\n")
    r = generate("--model", str(STORIES), "--prompt-file", str(f), "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Once upon a time") and lines[1].startswith("Tom had a red ball")


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens: expected an integer >= 0, got -1"),
    (["--top-p", "0"], "--top-p: expected a number in (0, 1]"),
    (["--temperature", "-1"], "--temperature: expected a finite number >= 0"),
    (["--temperature", "nan"], "--temperature: expected a finite number >= 0"),
    (["--temperature", "inf"], "--temperature: expected a finite number >= 0"),
    (["--top-k", "-1"], "--top-k: expected an integer >= 0"),
    (["--top-p", "nan"], "--top-p: expected a number in (0, 1]"),
    (["--seed", "-1"], "--seed: expected an integer in 0..9223372036854775807"),
    (["--seed", str(2**63)], "--seed: expected an integer in 0..9223372036854775807"),
    (["--device", "meta"], "--device: expected auto, cpu or cuda[:N]; got 'meta'"),
    (["--max-seq-len", "100000"], "--max-seq-len: 100000 positions is beyond the model's context of 512"),
    (["--dtype", "float64"], "--dtype: expected one of auto, float32, bfloat16, float16; got 'float64'"),
    (["--device", "tpu"], "--device"),
    (["--max-seq-len", "8"], "a prompt of 5 tokens plus 24 new tokens needs 29 positions, but the context holds 8 (--max-seq-len)"),
    (["--prompt", "Once upon a time " * 200], "positions, but the context holds 512 (max_position_embeddings"),
    (["--prompt-file", "/nonexistent/prompts.txt"], "--prompt-file: cannot read /nonexistent/prompts.txt"),
    (["--plan", "attn67"], "attn67: no such plan file, and not a preset name"),
])
def test_bad_cli_values_are_clear_errors(args, message):
    prompt = [] if "--prompt" in args or "--prompt-file" in args else ["--prompt", "Once upon a time"]
    r = generate("--model", str(STORIES), *prompt, "--max-new-tokens", "24", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and r.stdout == ""


def test_bad_checkpoints_are_clear_errors(tmp_path):
    r = generate("--model", str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
    r = generate("--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    bad = tmp_path / "gpt2"
    shutil.copytree(STORIES, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    r = generate("--model", str(bad), "--prompt", "hi")
    assert r.returncode == 2 and "field 'architectures'" in r.stderr and "Traceback" not in r.stderr
    trunc = tmp_path / "trunc"
    shutil.copytree(STORIES, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 3])
    r = generate("--model", str(trunc), "--prompt", "hi")
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("prompt", ["Once", "Once up", "Once upon a "])
def test_streamed_text_joins_the_prompt_as_decoding_does(prompt):
    """stdout is the prompt followed by exactly what decoding prompt + new ids adds (no `Onceupon`)."""
    r = generate("--model", str(STORIES), "--prompt", prompt, "--max-new-tokens", "8", "--no-compile")
    assert r.returncode == 0, r.stderr
    engine = runtime.load(str(STORIES), dtype="float32", device="cpu", compile=False)
    ids = engine.tokenizer.encode(prompt)
    new = engine.generate([ids], max_new_tokens=8).tokens[0]
    whole = engine.tokenizer.decode(ids + new)
    assert r.stdout == prompt + whole[len(engine.tokenizer.decode(ids)):] + "\n"
    assert "Onceupon" not in r.stdout


def test_plan_without_attention_warns_what_remains(tmp_path):
    plan = tmp_path / "no-attn.json"
    plan.write_text(json.dumps({"version": 1, "name": "no-attn", "drop": {"attention": [0, 1, 2, 3, 4]}}))
    r = generate("--model", str(STORIES), "--plan", str(plan), "--prompt", "Once", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert "warning: plan 'no-attn' keeps no attention sublayer: what remains is 5 MLP sublayer(s)" in r.stderr
    plan.write_text(json.dumps({"version": 1, "name": "nothing", "drop": {"block": [0, 1, 2, 3, 4]}}))
    r = generate("--model", str(STORIES), "--plan", str(plan), "--prompt", "Once", "--max-new-tokens", "3")
    assert r.returncode == 0 and "warning: plan 'nothing' keeps no sublayer at all" in r.stderr


def test_kv_cache_larger_than_memory_is_refused_with_its_bytes(monkeypatch, capsys):
    from runtime import generate as cli
    from runtime import kv_cache

    monkeypatch.setattr(kv_cache, "available_bytes", lambda device: 1000)
    rc = cli.main(["--model", str(STORIES), "--prompt", "Once", "--max-new-tokens", "4", "--no-compile"])
    err = capsys.readouterr().err
    assert rc == 2 and "a KV cache of 1 x 6 positions needs 7680 bytes" in err and "only 1000 bytes" in err
    assert "Traceback" not in err
