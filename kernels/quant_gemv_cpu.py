"""One row of activations times a quantized weight on CPU: the decode step's projection as a small C++
kernel (``quant_gemv_cpu.cpp``), registered as ``torch.ops.sublayer.quant_gemv`` so that a compiled
step (inductor, and the compile cache's AOTInductor packages) calls it like any other op.

Why not inductor's loop (``runtime.step.quant_multiply_reduce``, still the fallback): it keeps one
vector accumulator per reduction (every 16 weights wait on the previous add's latency) and no FMA,
converts every 4-bit weight to float, and leaves the streaming to the hardware prefetchers. The
kernel keeps four FMA accumulators, looks a 4-bit group's 16 possible weights up in one vector, and
prefetches 2 KiB ahead of each thread's rows: a SmolLM2 decode step takes 0.80x (int8) and 0.41x
(int4 g32) of the loop's time (``python -m bench.quant_gemv``, ``bench/results/latency/cpu-quant``).

It is built on first use with the system C++ compiler (``g++ -O3 -march=native -fopenmp``, about 8 s)
into ``$SUBLAYER_CACHE/kernels/`` (keyed by the source, torch's version and the CPU), installed
atomically; where no compiler works, ``available()`` is False (one line on stderr) and compiled steps
use the inductor loop. The rows are split over the OpenMP threads of the calling thread (torch's
thread count), the same OpenMP runtime inductor's kernels use.
"""

import hashlib
import subprocess
import sys
from pathlib import Path

import torch

from model.errors import UserError
from model.quant import QuantWeight

SOURCE = Path(__file__).with_suffix(".cpp")
# The op's schema and shape function live here, its CPU code in the library ``available()`` loads.
_LIB = torch.library.Library("sublayer", "DEF")
_LIB.define("quant_gemv(Tensor x, Tensor data, Tensor scale, Tensor? offset, int group_size) -> Tensor")


def quant_gemv(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x: [K] float32 (contiguous), w: [N, K] quantized -> [N] float32 (needs ``available()``). Its
    reference is every quantized projection's: ``kernels.quantized_matmul.quant_matmul_reference``
    (the weight dequantized, then multiplied in float32)."""
    return torch.ops.sublayer.quant_gemv(x, w.data, w.scale, w.offset, w.group_size)


def _build_command(out: Path) -> list[str]:
    from torch.utils import cpp_extension

    return (["g++", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
            + [f"-I{p}" for p in cpp_extension.include_paths()]
            + [str(SOURCE), "-o", str(out), f"-L{cpp_extension.library_paths()[0]}", "-lc10", "-ltorch_cpu"])


def library_path() -> Path:
    """Where the built kernel lives: keyed by its source, the build command, torch and the CPU."""
    from model.default_model import cache_root
    from runtime.compile_cache import cpu_key

    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(_build_command(Path("out"))).encode() + torch.__version__.encode() + cpu_key().encode())
    return cache_root() / "kernels" / f"quant_gemv-{h.hexdigest()[:16]}" / "quant_gemv.so"


_available = None


def available() -> bool:
    """Build (once per machine) and load the kernel; False, with a line on stderr, where that fails."""
    global _available
    if _available is None:
        _available = _build_and_load()
    return _available


# A compiler tracing a step runs ``available`` and takes its answer as a constant: what
# ``torch.compiler.assume_constant_result`` sets, without importing dynamo and inductor (seconds) into
# processes that only load compiled steps.
available._dynamo_marked_constant = True


def _build_and_load() -> bool:
    from model.atomic import install_dir

    path = library_path()
    try:
        if not path.exists():
            with install_dir(path.parent, replace=True) as tmp:
                subprocess.run(_build_command(tmp / path.name), check=True, capture_output=True, text=True)
        torch.ops.load_library(str(path))
        return True
    except (OSError, subprocess.CalledProcessError, UserError) as e:
        lines = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
        print(f"sublayer: cannot build the CPU quantized kernel ({lines[-1] if lines else type(e).__name__}); "
              f"quantized projections use the compiled loop instead", file=sys.stderr)
        return False


@torch.library.register_fake("sublayer::quant_gemv")
def _fake(x, data, scale, offset, group_size):
    return x.new_empty(data.shape[0])
