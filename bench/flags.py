"""Command-line values the bench scripts share (kept free of torch, so a load generator stays light)."""

from model.errors import UserError


def int_list(value: str, flag: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; anything else (empty, non-integers, values < 1) is a UserError naming ``flag``."""
    try:
        out = [int(v) for v in value.split(",") if v]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise UserError(f"{flag}: expected comma-separated positive integers, got {value!r}")
    return out
