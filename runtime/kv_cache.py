"""Static, preallocated KV cache: one slot per kept attention sublayer, written by index; its helpers."""

from pathlib import Path

import torch

from model.errors import UserError


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

    def copy_prefix(self, src: "KVCache", n: int, rows=None, src_row: int = 0, at: int = 0):
        """Copy ``src``'s row ``src_row`` positions 0..n-1 into this cache's ``rows`` (default all) at
        positions at..at+n-1."""
        rows = slice(None) if rows is None else rows
        self.k[:, rows, :, at:at + n] = src.k[:, src_row:src_row + 1, :, :n]
        self.v[:, rows, :, at:at + n] = src.v[:, src_row:src_row + 1, :, :n]

    def copy_rows(self, src: "KVCache", rows: torch.Tensor, n: int):
        """Positions 0..n-1 of this cache's row r become ``src``'s row ``rows[r]`` (rows: [batch] int64)."""
        self.k[:, :, :, :n] = src.k[:, :, :, :n].index_select(1, rows)
        self.v[:, :, :, :n] = src.v[:, :, :, :n].index_select(1, rows)


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can use: free device memory on CUDA, MemAvailable (/proc/meminfo) on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62  # no /proc/meminfo: nothing to compare against


def check_fits(nbytes: int, device: torch.device, what: str):
    """UserError naming the bytes asked for if ``nbytes`` exceed the memory available on ``device``
    (torch on Linux commits memory it cannot back, and the process is then killed)."""
    free = available_bytes(device)
    if nbytes > free:
        where = "free on the GPU" if device.type == "cuda" else "MemAvailable in /proc/meminfo"
        raise UserError(f"{what} needs {nbytes} bytes ({nbytes / 2**30:.2f} GiB), but only {free} bytes "
                        f"({free / 2**30:.2f} GiB) are available ({where}); lower --max-seq-len or the batch")
