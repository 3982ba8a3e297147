"""The error type for mistakes a user can fix (bad names, values, files)."""


class UserError(Exception):
    """A user mistake: the command line prints the message, names no traceback, and exits with 2."""
