"""Static, preallocated KV cache: one slot per kept attention sublayer, written by index."""

import torch


class KVCache:
    """k, v: [slots, batch, kv_heads, max_seq_len, head_dim] each."""

    def __init__(self, slots: int, batch: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (slots, batch, kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.max_seq_len = batch, max_seq_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def kv_bytes(slots: int, batch: int, max_seq_len: int, kv_heads: int, head_dim: int, elem: int) -> int:
    """2 (K and V) x kept attention sublayers x batch x positions x KV heads x head dim x element size."""
    return 2 * slots * batch * max_seq_len * kv_heads * head_dim * elem
