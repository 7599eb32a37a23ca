"""The one exception type of the data layer."""


class DataError(ValueError):
    """Bad input data: the message names the file, folder or field and what is wrong.

    A subclass of ValueError, so callers that catch ValueError for bad input keep working.
    """
