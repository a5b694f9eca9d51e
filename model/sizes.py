"""One parser for sizes given on the command line (``--shard-size``, ``--kv-memory``)."""

import re

from model.errors import UserError

_PREFIX = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text, flag: str, binary: bool) -> int:
    """'256M', '2GB', '1.5GiB' or a plain byte count -> bytes (positive). ``KiB``/``MiB``/... are always
    powers of 1024; plain ``K``/``M``/``G``/``T`` (with or without ``B``) are powers of 1024 when
    ``binary`` (``--kv-memory``, as memory is counted) and of 1000 otherwise (``--shard-size``, as
    Hugging Face counts shard sizes). UserError naming ``flag`` otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMGT]?)(I?B?)\s*", str(text), re.IGNORECASE)
    unit = m and m.group(3).upper()
    if not m or unit == "I" or (unit == "IB" and not m.group(2)):
        kind = "binary K/M/G/T" if binary else "KB/MB/GB = 10^3/10^6/10^9, KiB/MiB/GiB = 2^10/2^20/2^30"
        raise UserError(f"{flag}: expected a size such as 256M, 2GB or 1GiB ({kind}), got {text!r}")
    base = 1024 if binary or unit == "IB" else 1000
    n = int(float(m.group(1)) * base ** _PREFIX[m.group(2).upper()])
    if n <= 0:
        raise UserError(f"{flag}: must be a positive size, got {text!r}")
    return n
