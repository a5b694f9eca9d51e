"""The one exception type for user mistakes (bad plans, checkpoints, prompts, CLI values).

Entry points catch it and print its message without a traceback, exiting non-zero.
Messages name the file, the field and what was expected.
"""


class UserError(Exception):
    """A problem with the user's input, reported as a plain message."""


def read_json(path, error=UserError):
    """The JSON document at ``path``; an unreadable file or bad JSON is ``error`` naming the file."""
    import json

    try:
        return json.loads(open(path, encoding="utf-8").read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not readable JSON ({e})") from None
