"""One switch between the Triton kernels and their torch references.

CUDA tensors run Triton. CPU tensors run the torch reference, unless the environment
variable ``SUBLAYER_TRITON=1`` is set, in which case the Triton path runs on CPU too; that
only works under the Triton interpreter (``TRITON_INTERPRET=1`` set before ``kernels`` is
imported, as ``tests/conftest.py`` does).
"""

import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """True if ops on ``t`` should run the Triton kernels."""
    return t.is_cuda or os.environ.get("SUBLAYER_TRITON") == "1"


# Compile options every launcher passes explicitly. FP fusion (a*b+c as one FMA) is triton's
# default today but that default changes in triton 3.10; pinning it keeps numerics (and the compile
# test, which compiles with these same options) stable across versions.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
