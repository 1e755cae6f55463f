"""DataError: a dataset cannot be loaded as asked."""


class DataError(ValueError):
    """A dataset cannot be loaded as asked; the message says how to fix it."""
