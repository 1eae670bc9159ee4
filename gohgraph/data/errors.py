"""The error every data problem raises, and how its messages quote a path."""


class DataError(ValueError):
    """Training data that cannot be used: missing, empty, too short or not UTF-8 text."""


def quoted(text) -> str:
    """``'text'`` as the user typed it: ``repr`` would double a Windows path's backslashes."""
    return f"'{text}'"
