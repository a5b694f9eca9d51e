import pytest

from model.errors import UserError
from model.sizes import parse_size


def test_binary_sizes():
    """--kv-memory: K/M/G are powers of 1024, with or without B / iB."""
    assert parse_size("256M", "--kv-memory", binary=True) == 256 * 2**20
    assert parse_size("1g", "--kv-memory", binary=True) == 2**30
    assert parse_size("2GB", "--kv-memory", binary=True) == 2 * 2**30
    assert parse_size("1.5KiB", "--kv-memory", binary=True) == 1536
    assert parse_size("512", "--kv-memory", binary=True) == 512


def test_decimal_sizes():
    """--shard-size: KB/MB/GB are powers of 1000 (Hugging Face's shard sizes); KiB/MiB/GiB stay binary."""
    assert parse_size("2GB", "--shard-size", binary=False) == 2 * 10**9
    assert parse_size("500MB", "--shard-size", binary=False) == 500 * 10**6
    assert parse_size("1GiB", "--shard-size", binary=False) == 2**30
    assert parse_size("100", "--shard-size", binary=False) == 100


@pytest.mark.parametrize("bad", ["", "-1M", "lots", "0", "nanM", "inf", "1.5XB", "2iB", "1 G B", "0.1"])
@pytest.mark.parametrize("flag,binary", [("--kv-memory", True), ("--shard-size", False)])
def test_bad_sizes_name_the_flag(bad, flag, binary):
    with pytest.raises(UserError, match=flag):
        parse_size(bad, flag, binary)
