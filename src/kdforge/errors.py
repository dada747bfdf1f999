"""The one exception type for problems a user can fix: the CLI prints its message on one line."""


class KdforgeError(Exception):
    """Bad input, a missing file, a stale cache...: the message says what and where."""
