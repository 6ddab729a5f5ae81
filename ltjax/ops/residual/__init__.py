"""Bit packing of training residuals: the op in `api`, the jnp ground truth in `reference`."""

from ltjax.ops.residual.api import IMPLEMENTATIONS, pack_mask, pack_sparse, unpack_mask, unpack_sparse
from ltjax.ops.residual.reference import (
    num_words,
    pack_mask_reference,
    pack_sparse_reference,
    unpack_mask_reference,
    unpack_sparse_reference,
)

__all__ = [
    "IMPLEMENTATIONS",
    "num_words",
    "pack_mask",
    "pack_mask_reference",
    "pack_sparse",
    "pack_sparse_reference",
    "unpack_mask",
    "unpack_mask_reference",
    "unpack_sparse",
    "unpack_sparse_reference",
]
