"""Error types that decide the CLI's exit code.

`UserError` means the user can fix it (bad recipe, data, usage): exit 2 with
the message alone, no traceback. Anything else is a bug or an outage: exit 1.
"""


class UserError(Exception):
    """A problem in the user's input; the message names the file, key or row and the fix."""
