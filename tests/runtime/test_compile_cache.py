"""The on-disk compile cache of the decode steps (``runtime.compile_cache``): an entry is built once and
loaded by later processes without compiling; a truncated, corrupt or stale entry is noticed, never
crashes a run, and is rebuilt; a cold cache on a short CLI job decodes eagerly and says so; --threads
is checked. Entries of stories260K live in the user's cache (built by the first run, reused after)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime
from bench.hf_reference import STORIES
from model.errors import UserError
from runtime import compile_cache, fast_decode
from runtime.threads import allowed_cores

ROOT = Path(__file__).resolve().parents[2]


def counts():
    return dict(fast_decode.CALLS)


def delta(before, key):
    return fast_decode.CALLS[key] - before.get(key, 0)


@pytest.fixture(scope="module")
def stories_entries():
    """stories260K's three float32 batch-1 entries in the user's cache (built here if missing)."""
    engine = runtime.load(str(STORIES), dtype="float32", device="cpu")
    fast_decode.warm(engine, 1)
    return engine


def run_generate(*args, env=None):
    return subprocess.run([sys.executable, "-m", "runtime.generate", "--model", str(STORIES), "--dtype", "float32",
                           "--prompt", "Once upon a time", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_entries_are_reused_by_later_loads_and_processes(stories_entries):
    engine = stories_entries
    before = counts()
    other = runtime.load(str(STORIES), dtype="float32", device="cpu")  # same shapes: nothing loaded again
    g = other.generate("Once upon a time", max_new_tokens=4)
    assert delta(before, "cache build") == 0 and delta(before, "cache hit") == 0
    assert delta(before, "compiled attention") > 0 and delta(before, "eager attention") == 0
    eager = runtime.load(str(STORIES), dtype="float32", device="cpu", compile=False)
    assert g.tokens == eager.generate("Once upon a time", max_new_tokens=4).tokens
    # a fresh process loads all three from disk and compiles nothing
    script = ("import runtime; from runtime import fast_decode as f\n"
              f"e = runtime.load({str(STORIES)!r}, dtype='float32', device='cpu')\n"
              "e.generate('Once upon a time', max_new_tokens=3)\n"
              "print(f.CALLS['cache build'], f.CALLS['cache hit'], f.CALLS['compiled head'], "
              "'torch._inductor' in __import__('sys').modules)")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    builds, hits, head_calls, inductor = out.stdout.split()
    assert (builds, hits, head_calls) == ("0", "3", "2") and inductor == "False"  # loading needs no compiler
    assert engine.decode_mode == "compiled"


@pytest.mark.parametrize("rows", [1, 3])
def test_cached_steps_match_the_eager_step(stories_entries, monkeypatch, capsys, rows):
    """Decode logits through the cached steps against the eager step (itself within 1e-4 of Hugging
    Face, tests/runtime/test_engine.py), rows at different cache positions."""
    monkeypatch.setattr(fast_decode, "cold_start", "build")
    cached = stories_entries
    eager = runtime.load(str(STORIES), dtype="float32", device="cpu", compile=False)
    torch.manual_seed(0)
    tokens = torch.randint(3, 500, (rows, 12))
    index0 = torch.arange(rows) * 2 + 3  # row r decodes from cache index 3 + 2r
    kv_start = torch.zeros(rows, dtype=torch.int32)
    logits = []
    for e in (cached, eager):
        cache = e.new_cache(rows, 32)
        before = counts()
        out = [e.decode_step(tokens[:, i:i + 1], cache, index0 + i, kv_start) for i in range(tokens.shape[1])]
        logits.append(torch.stack(out))
        if e is cached:  # every step through a cache entry: none eager, none compiled in-process
            for name in ("attention", "mlp", "head"):
                assert delta(before, f"compiled {name}") > 0 and delta(before, f"compiled {name} (jit)") == 0
            assert delta(before, "compiled head") == tokens.shape[1] and delta(before, "eager head") == 0
    assert "cannot build" not in capsys.readouterr().err
    err = ((logits[0] - logits[1]).abs().amax() / logits[1].abs().amax()).item()
    assert err < 1e-5


def test_batch_sizes_from_two_up_share_one_entry(stories_entries, monkeypatch):
    engine = stories_entries
    monkeypatch.setattr(fast_decode, "cold_start", "build")
    engine.generate(["Once upon a time", "The dog"], max_new_tokens=3)  # builds or loads the B >= 2 entries
    before = counts()
    engine.generate(["Once upon a time", "The dog", "A cat sat"], max_new_tokens=3)
    assert delta(before, "cache build") == 0 and delta(before, "cache hit") == 0
    assert delta(before, "compiled attention") > 0 and delta(before, "compiled attention (jit)") == 0


def corrupt_copy(tmp_path, monkeypatch, how):
    """A private cache holding a copy of stories260K's entries, the head's damaged ``how``."""
    src = compile_cache.cache_dir()
    monkeypatch.setenv("SUBLAYER_CACHE", str(tmp_path))
    engine = runtime.load(str(STORIES), dtype="float32", device="cpu")
    dst = compile_cache.cache_dir()
    dst.mkdir(parents=True)
    # the entries this engine uses: resolve their paths the way the steps do
    x = torch.zeros(1, 1, engine.config.hidden_size)
    key, _ = compile_cache.describe((torch.zeros_like(x), x, engine.final_norm, engine.lm_head,
                                     engine.config.rms_norm_eps), fast_decode.compiled_steps().head.dynamic[1],
                                    fast_decode._SIZES)
    head = compile_cache.entry_path("head", key)[0]
    for p in src.iterdir():
        if (p / compile_cache.KEY_FILE).is_file():
            shutil.copytree(p, dst / p.name)
    assert head.is_dir(), "the head entry of stories260K should have been built by the fixture"
    pkg = head / compile_cache.PACKAGE
    if how == "truncated":
        pkg.write_bytes(pkg.read_bytes()[: pkg.stat().st_size // 2])
    elif how == "stale":
        meta = json.loads((head / compile_cache.KEY_FILE).read_text())
        (head / compile_cache.KEY_FILE).write_text(json.dumps({**meta, "key": meta["key"].replace("head", "hea")}))
    return engine, head


@pytest.mark.parametrize("how", ["truncated", "stale"])
def test_a_damaged_entry_is_noticed_and_never_crashes_the_run(stories_entries, tmp_path, monkeypatch, capsys, how):
    engine, head = corrupt_copy(tmp_path, monkeypatch, how)
    monkeypatch.setattr(fast_decode, "cold_start", "eager")  # rebuilding is the slow test below
    fast_decode.compiled_steps.cache_clear()  # a fresh process's view of the cache
    try:
        before = counts()
        g = engine.generate("Once upon a time", max_new_tokens=4)
    finally:
        fast_decode.compiled_steps.cache_clear()
    err = capsys.readouterr().err
    assert f"compile cache: {head.name} is unusable" in err and "rebuilding it" in err
    assert ("truncated or corrupt" if how == "truncated" else "stale") in err
    assert delta(before, "eager head") == 3 and delta(before, "cache hit") == 2  # attention and MLP still load
    eager = runtime.load(str(STORIES), dtype="float32", device="cpu", compile=False)
    assert g.tokens == eager.generate("Once upon a time", max_new_tokens=4).tokens


@pytest.mark.slow
def test_a_truncated_entry_is_rebuilt(stories_entries, tmp_path, monkeypatch, capsys):
    engine, head = corrupt_copy(tmp_path, monkeypatch, "truncated")
    monkeypatch.setattr(fast_decode, "cold_start", "build")
    fast_decode.compiled_steps.cache_clear()
    try:
        before = counts()
        engine.generate("Once upon a time", max_new_tokens=3)
        assert delta(before, "cache build") == 1 and delta(before, "compiled head") == 2
        assert "rebuilding it" in capsys.readouterr().err
        assert compile_cache.load(head, json.loads((head / compile_cache.KEY_FILE).read_text())["key"]) is not None
    finally:
        fast_decode.compiled_steps.cache_clear()


def test_cold_cache_on_a_short_job_decodes_eagerly_and_says_so(tmp_path):
    out = run_generate("--max-new-tokens", "6", env={"SUBLAYER_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    compile_lines = [line for line in lines if line.startswith("compile:")]
    assert len(compile_lines) == 1 and "compile cache cold" in compile_lines[0]
    assert "decode eagerly" in compile_lines[0] and "python -m runtime.compile_cache" in compile_lines[0]
    assert not (tmp_path / "compiled").exists() or not any((tmp_path / "compiled").iterdir())
    eager = runtime.load(str(STORIES), dtype="float32", device="cpu", compile=False)
    assert out.stdout.strip() == "Once upon a time" + eager.generate("Once upon a time", max_new_tokens=6).texts[0]


@pytest.mark.parametrize("value", ["0", "-1", str(allowed_cores() + 1), "two"])
def test_bad_threads_are_a_clear_error(value):
    out = run_generate("--threads", value, "--max-new-tokens", "2")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--threads" in out.stderr and (value == "two" or f"1 to {allowed_cores()}" in out.stderr)


@pytest.mark.parametrize("value", [0, -2, allowed_cores() + 1, 1.5, True])
def test_load_refuses_bad_threads(value):
    with pytest.raises(UserError, match=r"--threads: expected an integer from 1 to \d+"):
        runtime.load(str(STORIES), dtype="float32", device="cpu", threads=value)


def test_load_sets_the_threads():
    n = torch.get_num_threads()
    try:
        runtime.load(str(STORIES), dtype="float32", device="cpu", threads=1)
        assert torch.get_num_threads() == 1
        runtime.load(str(STORIES), dtype="float32", device="cpu")  # None keeps the process's setting
        assert torch.get_num_threads() == 1
        torch.set_num_threads(allowed_cores() + 3)
        runtime.load(str(STORIES), dtype="float32", device="cpu")  # ... capped at the allowed cores
        assert torch.get_num_threads() == allowed_cores()
    finally:
        torch.set_num_threads(n)


def test_engines_sharing_norms_but_not_weight_kinds_get_their_own_entries(monkeypatch):
    """A quantized engine and its dequantized twin (the twin shares the norm tensors): each call runs
    the entry of its own structure (the fast path was once keyed on the norm and ran the other's)."""
    from model.quant import quantize

    loaded = []

    def fake_load(path, full):  # a loaded entry that returns how many tensor leaves it was given
        loaded.append(path.name)
        return lambda tensors: (tensors[1], torch.full_like(tensors[1], len(tensors)))

    monkeypatch.setattr(compile_cache, "load", fake_load)
    step = fast_decode.CachedStep("mlp", None, {0: {0: "B"}, 1: {0: "B"}}, lambda a: a, None, None)
    norm = torch.ones(64)
    x = torch.randn(1, 1, 64)
    w = quantize(torch.randn(128, 64), "int8"), quantize(torch.randn(64, 64), "int8")
    floats = torch.randn(128, 64), torch.randn(64, 64)
    _, quant_leaves = step(torch.zeros_like(x), x, norm, *w, 1e-5)
    _, float_leaves = step(torch.zeros_like(x), x, norm, *floats, 1e-5)
    assert len(set(loaded)) == 2  # two structures, two entries
    assert int(quant_leaves.flatten()[0]) == 7 and int(float_leaves.flatten()[0]) == 5  # x, pending, norm + weights
    _, again = step(torch.zeros_like(x), x, norm, *w, 1e-5)
    assert int(again.flatten()[0]) == 7 and len(loaded) == 2
