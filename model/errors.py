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
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a 5000-digit number
        raise error(f"{path}: not readable JSON ({str(e)[:200]})") from None


def cli_main(main):
    """Decorator for an entry point's ``main(argv=None) -> int``: a ``UserError`` prints
    ``error: <message>`` on stderr and returns 2; Ctrl-C prints one line and returns 130. No traceback
    for either (every other exception is a bug and keeps its traceback)."""
    import functools
    import sys

    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C)", file=sys.stderr)
            return 130

    return run
