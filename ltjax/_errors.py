"""Errors raised by ltjax for bad files and bad input."""


class LTFormatError(ValueError):
    """A file or header that is not a valid LT-Block container of a version we read."""


class ChecksumError(LTFormatError):
    """Stored bytes that do not match the CRC32C recorded for them at pack time.

    Attributes:
      tensor: the tree path of the tensor whose bytes are damaged.
      tile: the index of the damaged tile (or None for a dense leaf / the header).
    """

    def __init__(self, message: str, *, tensor: str | None = None, tile: int | None = None):
        super().__init__(message)
        self.tensor = tensor
        self.tile = tile
