"""The one exception type for input a user can fix; the CLI prints its message as one line."""


class ClipAdaptError(Exception):
    """Bad input (a file, a flag, a checkpoint) with the fix in the message; `clipadapt` exits non-zero on it."""
