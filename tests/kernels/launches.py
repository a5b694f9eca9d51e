"""The kernel launches the runtime makes for real model shapes, recorded instead of run (on meta tensors:
no data, real shapes, strides and dtypes), and the key under which Triton's JIT would cache each one's
compiled binary. The ptxas test compiles these launches; the specialisation test counts their keys."""

import contextlib
from dataclasses import dataclass

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from kernels import activation, attention_decode, attention_prefill, rmsnorm, rotary

MODULES = [rmsnorm, activation, rotary, attention_prefill, attention_decode]

# Model shapes (from the checkpoints' config.json), and one KV head at 32k positions (the longest
# flash-decoding split).
MODELS = {
    "llama2-7b": dict(hidden=4096, heads=32, kv_heads=32, head_dim=128, inter=11008, max_seq=4096),
    "llama3-8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336, max_seq=4096),
    "smollm2-135m": dict(hidden=576, heads=9, kv_heads=3, head_dim=64, inter=1536, max_seq=4096),
    "stories260k": dict(hidden=64, heads=8, kv_heads=4, head_dim=8, inter=172, max_seq=512),
    "mqa-32k": dict(hidden=2048, heads=16, kv_heads=1, head_dim=128, inter=5632, max_seq=32768),
}


@dataclass
class Launch:
    what: str  # phase/kernel name and its boolean flags
    kernel: object  # the @triton.jit function (an InterpretedFunction under TRITON_INTERPRET)
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, what, sink):
        self.kernel, self.what, self.sink = kernel, what, sink

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            flags = "".join(f" {k}={v}" for k, v in kwargs.items() if k.isupper() and isinstance(v, bool))
            self.sink.append(Launch(self.what + flags, self.kernel, tuple(grid), args, kwargs))
        return record


@contextlib.contextmanager
def recording(sink: list, what: str):
    """Every kernel of ``kernels`` records its launches into ``sink`` (labelled ``what/name``) instead of running."""
    saved = []
    for module in MODULES:
        for name, obj in list(vars(module).items()):
            if name.startswith("_") and name.endswith("_kernel"):
                saved.append((module, name, obj))
                setattr(module, name, _Recorder(obj, f"{what}/{name.strip('_')}", sink))
    try:
        yield
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


def model_launches(model: str, dtype: torch.dtype, batch=1, prompt=512, cache_len=None,
                   phases=("prefill", "prefill7", "decode")) -> list[Launch]:
    """Every kernel launch of a prefill of `prompt` tokens, a short prefill (7 tokens: a smaller query
    tile) and one decode step over a cache of `cache_len` positions (default: the model's maximum), as
    the runtime's launchers make them."""
    m = MODELS[model]
    H, Hq, Hkv, D, I = m["hidden"], m["heads"], m["kv_heads"], m["head_dim"], m["inter"]
    S = cache_len or m["max_seq"]
    meta = dict(device="meta", dtype=dtype)
    weight = torch.empty(H, **meta)
    cos = sin = torch.empty(m["max_seq"], D, device="meta", dtype=torch.float32)
    k_cache, v_cache = torch.empty(batch, Hkv, S, D, **meta), torch.empty(batch, Hkv, S, D, **meta)
    kv_start = torch.empty(batch, device="meta", dtype=torch.int64)
    kv_end = torch.empty(batch, device="meta", dtype=torch.int32)  # the engine's dtypes
    launches = []
    lengths = {"prefill": min(prompt, S), "prefill7": min(7, S), "decode": 1}
    for phase in phases:
        T = lengths[phase]
        with recording(launches, f"prefill{T}" if phase != "decode" else phase):
            x = torch.empty(batch, T, H, **meta)
            rmsnorm.add_rmsnorm_triton(None, x, weight, 1e-5)
            rmsnorm.add_rmsnorm_triton(x, x, weight, 1e-5)
            activation.swiglu_triton(torch.empty(batch, T, 2 * I, **meta))
            qkv = torch.empty(batch, T, Hq + 2 * Hkv, D, **meta)  # fused projection, split into views
            q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
            positions = torch.empty(batch, T, device="meta", dtype=torch.int64)
            q_rot = rotary.rotary_write_kv_triton(q, k, v, cos, sin, positions, k_cache, v_cache, 0)
            if phase != "decode":
                attention_prefill.prefill_attention_triton(q_rot, k_cache, v_cache, 0, kv_start, D ** -0.5)
            else:
                # A decode step captured in a CUDA graph passes the write index as a device tensor.
                start = torch.empty(1, device="meta", dtype=torch.int64)
                rotary.rotary_write_kv_triton(q, k, v, cos, sin, positions, k_cache, v_cache, start)
                attention_decode.decode_attention_triton(q_rot[:, 0], k_cache, v_cache, kv_start, kv_end,
                                                         D ** -0.5)
    return launches


def as_jit(kernel) -> JITFunction:
    """The kernel as Triton's JIT sees it (under the interpreter, rebuilt from the same function and options)."""
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)


def bind(launch: Launch, arch: int):
    """Triton's own argument binding for ``launch`` on ``arch``: (bound args, specialization, options, backend)."""
    fn = as_jit(launch.kernel)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **{"debug": False, **launch.kwargs})
    return fn, bound_args, specialization, options, backend


def jit_cache_key(launch: Launch, arch: int = 90) -> tuple:
    """What ``JITFunction.run`` keys its compiled-kernel cache on: one distinct key = one compilation."""
    fn, _, specialization, options, _ = bind(launch, arch)
    return fn.fn.__name__, tuple(map(str, specialization)), str(options)
