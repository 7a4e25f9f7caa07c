"""`DataError`: the one exception of the data-file readers, below both `files` and `formats`."""

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad data or a bad ``--data`` value; the message is one line naming the file, line/row and field."""
