"""The one exception type for user mistakes (bad plans, checkpoints, prompts, CLI values).

Entry points catch it and print its message without a traceback, exiting non-zero.
Messages name the file, the field and what was expected.
"""


class UserError(Exception):
    """A problem with the user's input, reported as a plain message."""
