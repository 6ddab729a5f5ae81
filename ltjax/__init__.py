"""ltjax: compressed tensors that JAX programs compute on directly."""

from ltjax._errors import ChecksumError, LTFormatError
from ltjax._format import CODECS, FORMAT_VERSION, CompressedTensor, Header
from ltjax._ops import decompress, matmul, matmul_reference

__version__ = "0.1.0"

__all__ = [
    "CODECS",
    "FORMAT_VERSION",
    "ChecksumError",
    "CompressedTensor",
    "Header",
    "LTFormatError",
    "decompress",
    "matmul",
    "matmul_reference",
]
