"""The error every data problem raises."""


class DataError(ValueError):
    """Training data that cannot be used: missing, empty, too short or not UTF-8 text."""
