"""The ops each schedule step calls: Triton kernels on CUDA, torch references on CPU."""

from kernels.attention_decode import decode_attention
from kernels.attention_prefill import prefill_attention
from kernels.rmsnorm import add_rmsnorm
from kernels.rotary import rope_inv_freq, rope_tables, rotary_write_kv
from kernels.activation import swiglu
from kernels.quantized_matmul import quant_matmul

__all__ = ["add_rmsnorm", "decode_attention", "prefill_attention", "quant_matmul", "rope_inv_freq", "rope_tables",
           "rotary_write_kv", "swiglu"]
