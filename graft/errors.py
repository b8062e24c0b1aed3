"""The one exception type that means "the user gave us bad input".

The CLI turns it into a one-line message on stderr and exit code 2, never a traceback.
"""


class UserError(Exception):
    """Bad input from the user: a config key, a value, a file. The message names it."""
