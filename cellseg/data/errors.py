"""The one exception type for unusable input data."""


class DataError(ValueError):
    """A dataset file or folder that cannot be used; the message names it and says how to fix it."""
