"""One switch between the Triton kernels and their torch references, and one way to launch a kernel.

CUDA tensors run Triton. CPU tensors run the torch reference, unless the environment variable
``SUBLAYER_TRITON=1`` is set, in which case the Triton path runs on CPU too; that only works under
the Triton interpreter (``TRITON_INTERPRET=1`` set before ``kernels`` is imported, as
``tests/conftest.py`` does), and asking for it without the interpreter is an error (compiled Triton
would be handed CPU pointers).
"""

import contextlib
import os

import torch

# Read once, before any kernel module's @triton.jit runs (they all import this module first): the
# interpreter is chosen when a kernel is decorated, not when it is launched. (Triton reads the same
# variable; older versions have no `triton.knobs` to ask.)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Compile options every launch passes explicitly. FP fusion (a*b+c as one FMA) is triton's default
# today but that default changes in triton 3.10; pinning it keeps numerics (and the ptxas test, which
# compiles with these same options) stable across versions.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def use_triton(t: torch.Tensor) -> bool:
    """True if ops on ``t`` should run the Triton kernels."""
    if t.is_cuda:
        return True
    if os.environ.get("SUBLAYER_TRITON") != "1":
        return False
    if not INTERPRETED:
        raise RuntimeError("SUBLAYER_TRITON=1 runs the Triton kernels on CPU tensors, which needs the Triton "
                           "interpreter: set TRITON_INTERPRET=1 before importing kernels")
    return True


def on_device(device: torch.device):
    """The context a launch for tensors on ``device`` runs in: that CUDA device made current (Triton
    launches on, and takes its stream from, the current device, which for ``cuda:N`` need not be N)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, grid, device: torch.device, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` with ``LAUNCH_OPTIONS``, on ``device`` (see ``on_device``)."""
    with on_device(device):
        kernel[grid](*args, **kwargs, **LAUNCH_OPTIONS)
