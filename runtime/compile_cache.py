"""Ahead-of-time compiled decode steps, cached on disk: the first process on a machine compiles each
step function (``torch.export`` with the cache length dynamic, then AOTInductor) and stores it; later
processes load it in milliseconds instead of compiling again.

Entries live in ``$SUBLAYER_CACHE/compiled/`` (default ``~/.cache/sublayer/compiled/``), one directory
per step variant, ``<step>-<16 hex digits of the key's SHA-256>/`` holding ``step.pt2`` (the package)
and ``key.json`` (the key in full and the package's SHA-256). The key is everything that changes the
compiled code: the step's name, its argument structure (the pytree spec of its arguments, and per leaf
the dtype, shape and strides of a tensor, except the dynamic cache length, or the value of a constant),
the torch version, the CPU's capabilities, the number of threads the code is generated for, and a hash
of the source of the step code. Each entry is installed atomically (``model.atomic.install_dir``); an
entry whose key or checksum does not match, or which does not load, is rebuilt with a one-line note.

    python -m runtime.compile_cache --model smollm2-135m-instruct --dtype bfloat16   # warm it once
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from model.atomic import install_dir
from model.default_model import cache_root
from model.errors import UserError, cli_main

FORMAT = 1
PACKAGE, KEY_FILE = "step.pt2", "key.json"
# The sources whose code is compiled into a CPU step (the kernels' torch references it calls): a change
# to any of them makes every entry stale. A step that calls into another file must list it here; a
# change to this file that changes what is exported bumps FORMAT.
_SOURCES = ("runtime/step.py", "runtime/fast_decode.py", "kernels/rmsnorm.py", "kernels/rotary.py",
            "kernels/activation.py", "kernels/dispatch.py")
# Only for steps that take quantized weights; their code also depends on whether the C++ kernel is built.
_QUANT_SOURCES = ("model/quant.py", "kernels/quantized_matmul.py", "kernels/quant_gemv_cpu.py",
                  "kernels/quant_gemv_cpu.cpp")
_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """``$SUBLAYER_CACHE/compiled`` (read per call: tests and users may change the variable)."""
    return cache_root() / "compiled"


@functools.cache
def _code_hash(quant: bool) -> str:
    h = hashlib.sha256()
    for name in _SOURCES + (_QUANT_SOURCES if quant else ()):
        p = _ROOT / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.exists() else b""))
    if quant:  # built and loaded now, before any package that calls it is loaded or built
        from kernels import quant_gemv_cpu

        h.update(b"quant_gemv" if quant_gemv_cpu.available() else b"loop")
    return h.hexdigest()[:16]


@functools.cache
def cpu_key() -> str:
    """The vector ISA torch dispatches to and a hash of the CPU's feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}-"
            f"{hashlib.sha256(flags.encode()).hexdigest()[:8]}")


def environment(quant: bool = False) -> dict:
    return {"format": FORMAT, "torch": torch.__version__, "cpu": cpu_key(), "threads": torch.get_num_threads(),
            "code": _code_hash(quant)}


class TooSmall(ValueError):
    """A dynamic dimension below the compiled step's minimum (this call only runs on another path)."""


def describe(args: tuple, dynamic: dict[int, dict[int, str]], sizes: dict[str, tuple[int, int]]):
    """The structure of a call: (key, tensors). ``dynamic`` maps a positional argument to its dynamic
    dimensions ({dim: name}; one name, one size); such an argument must be a contiguous tensor, its
    size at least the name's minimum in ``sizes`` ({name: (example size, minimum)}). The key
    is JSON-able: the pytree spec and per leaf ("tensor", dtype, device, shape with -1 for a dynamic
    size, strides or None) or ("const", type, value)."""
    leaves, spec = pytree.tree_flatten(args)
    desc, tensors = [], []
    for v, pos in zip(leaves, _leaf_positions(args)):
        if isinstance(v, torch.Tensor):
            shape, stride = list(v.shape), list(v.stride())
            if pos in dynamic:
                if not v.is_contiguous():
                    raise ValueError(f"argument {pos} is not contiguous")
                for dim, name in dynamic[pos].items():
                    if shape[dim] < sizes[name][1]:
                        raise TooSmall(f"argument {pos} has {shape[dim]} < {sizes[name][1]} along {name}")
                    shape[dim] = -1
                stride = None
            desc.append(["tensor", str(v.dtype), v.device.type, shape, stride])
            tensors.append(v)
        else:
            desc.append(["const", type(v).__name__, v if isinstance(v, (int, float, str, bool)) or v is None else repr(v)])
    return {"spec": str(spec), "leaves": desc}, tensors


def _leaf_positions(args: tuple) -> list[int]:
    """The top-level argument each pytree leaf of ``args`` comes from."""
    return [i for i, a in enumerate(args) for _ in pytree.tree_leaves(a)]


def entry_path(name: str, key: dict) -> tuple[Path, str]:
    """The entry directory of step ``name`` with call structure ``key`` (from ``describe``) in this
    environment, and the full key as a string."""
    full = json.dumps({"step": name, "call": key, **environment("QuantWeight" in key["spec"])}, sort_keys=True)
    return cache_dir() / f"{name}-{hashlib.sha256(full.encode()).hexdigest()[:16]}", full


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Runner:
    """A loaded package: ``runner(tensors)`` runs it on the call's tensor leaves, in pytree order."""

    def __init__(self, path: Path):
        # The loader itself, not torch._inductor.aoti_load_package: importing torch._inductor takes seconds.
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path / PACKAGE), "model", False, 1, -1)
        self._run = loader.run
        spec = self._out_spec = pytree.treespec_loads(loader.get_call_spec()[1])
        self._single = spec.is_leaf()
        # a flat tuple of tensors (the steps' (x, out)): built directly, without the pytree walk per call
        self._flat_tuple = spec.type is tuple and all(c.is_leaf() for c in spec.children())

    def __call__(self, tensors: list):
        out = self._run(tensors)
        if self._single:
            return out[0]
        return tuple(out) if self._flat_tuple else pytree.tree_unflatten(out, self._out_spec)


def load(path: Path, full_key: str, note=None) -> Runner | None:
    """The entry at ``path`` if it is complete and matches ``full_key``; None if it is missing, or (with
    a one-line note) unusable: truncated, corrupt, or another key's."""
    note = note or _note
    if not path.exists():
        return None
    try:
        meta = json.loads((path / KEY_FILE).read_text())
        if meta.get("key") != full_key:
            raise ValueError("its key differs (stale)")
        if _sha256(path / PACKAGE) != meta.get("sha256"):
            raise ValueError(f"{PACKAGE} does not match its checksum (truncated or corrupt)")
        return Runner(path)
    except Exception as e:  # anything wrong with an entry means: build it again
        reason = e if isinstance(e, ValueError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        note(f"compile cache: {path.name} is unusable ({reason}); rebuilding it")
        return None


def _note(msg: str):
    print(msg, file=sys.stderr, flush=True)


def build(path: Path, full_key: str, fn, args: tuple, dynamic: dict[int, dict[int, str]],
          sizes: dict[str, tuple[int, int]]) -> Runner:
    """Export ``fn(*args)`` (``dynamic`` and ``sizes`` as in ``describe``; constants baked in), compile
    it with AOTInductor and install it at ``path`` (replacing whatever is there). Only the arguments'
    structure is used: the export runs on zero tensors of the same layout, a dynamic dimension at its
    example size (not 0 or 1, which the export would specialise on)."""
    leaves, spec = pytree.tree_flatten(args)
    inputs, shapes, dims = [], [], {}
    for v, pos in zip(leaves, _leaf_positions(args)):
        if not isinstance(v, torch.Tensor):
            continue
        if pos in dynamic:
            shape = list(v.shape)
            for dim, name in dynamic[pos].items():
                shape[dim] = sizes[name][0]
            inputs.append(torch.zeros(shape, dtype=v.dtype))
            shapes.append({dim: dims.setdefault(name, torch.export.Dim(name, min=sizes[name][1]))
                           for dim, name in dynamic[pos].items()})
        else:
            inputs.append(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype).zero_())
            shapes.append(None)
    consts = [None if isinstance(v, torch.Tensor) else v for v in leaves]

    class Step(torch.nn.Module):
        def forward(self, *tensors):
            it = iter(tensors)
            return fn(*pytree.tree_unflatten([next(it) if c is None and isinstance(v, torch.Tensor) else c
                                              for c, v in zip(consts, leaves)], spec))

    ep = torch.export.export(Step(), tuple(inputs), dynamic_shapes=(tuple(shapes),), strict=False)
    with install_dir(path, replace=True) as tmp:
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp / PACKAGE))
        (tmp / KEY_FILE).write_text(json.dumps({"key": full_key, "sha256": _sha256(tmp / PACKAGE)}, indent=1))
    return Runner(path)


def size_bytes() -> int:
    d = cache_dir()
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else 0


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.compile_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory or known name (default: smollm2-135m-instruct)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--plan", default=None, help="plan JSON path or preset name (default: full)")
    p.add_argument("--batch", type=int, default=1, help="rows per decode step to compile for (default 1)")
    p.add_argument("--threads", type=int, default=None, help="threads to compile for (default: the cores this process may use)")
    args = p.parse_args(argv)
    if args.batch < 1:
        raise UserError(f"--batch: expected a positive integer, got {args.batch}")
    import runtime
    from runtime import fast_decode

    engine = runtime.load(args.model, plan=args.plan, dtype=args.dtype, device="cpu", threads=args.threads)
    before = dict(fast_decode.CALLS)
    t0 = time.perf_counter()
    fast_decode.warm(engine, args.batch)
    built = fast_decode.CALLS["cache build"] - before.get("cache build", 0)
    hits = fast_decode.CALLS["cache hit"] - before.get("cache hit", 0)
    print(f"compile cache: {built} step(s) built, {hits} already there, in {time.perf_counter() - t0:.1f} s "
          f"({engine.dtype}, batch {args.batch}, {torch.get_num_threads()} threads)", file=sys.stderr)
    print(f"compile cache: {cache_dir()} holds {size_bytes() / 2**20:.1f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
