"""Bit packing of training residuals in pure jnp: the ground truth, and the path off a GPU.

A mask is packed 32 bits a uint32 word (bit ``i % 32`` of word ``i // 32``); a sparse tensor as
its mask words plus its nonzeros in C order, up to a fixed capacity.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from ltjax.ops._dispatch import ANYWHERE, Implementation

_WORD_BITS = 32


def num_words(n: int) -> int:
    """Number of uint32 words that hold ``n`` mask bits."""
    return -(-n // _WORD_BITS)


def pack_mask_reference(mask: jax.Array) -> jax.Array:
    """Packs a boolean array (any shape, flattened C-order) into uint32 words.

    Bit ``i % 32`` of word ``i // 32`` is ``mask.ravel()[i]``; the tail of the last word
    is zero. Hand-packed with shifts and a sum of disjoint bits (``jnp.packbits`` costs
    4 bits per element on XLA CPU, this costs 1).
    """
    flat = jnp.ravel(mask).astype(jnp.uint32)
    n = flat.shape[0]
    flat = jnp.pad(flat, (0, num_words(n) * _WORD_BITS - n))
    shifts = jnp.arange(_WORD_BITS, dtype=jnp.uint32)
    return jnp.sum(flat.reshape(-1, _WORD_BITS) << shifts, axis=-1, dtype=jnp.uint32)


def unpack_mask_reference(words: jax.Array, n: int) -> jax.Array:
    """Inverse of :func:`pack_mask_reference`: the first ``n`` bits as a flat bool array."""
    shifts = jnp.arange(_WORD_BITS, dtype=jnp.uint32)
    bits = (words[:, None] >> shifts) & jnp.uint32(1)
    return bits.reshape(-1)[:n].astype(jnp.bool_)


def _nonzero_bits(x: jax.Array) -> jax.Array:
    """``x != 0`` on the bit pattern: -0.0 and NaN count as nonzero, so they round-trip."""
    uint = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    return lax.bitcast_convert_type(x, uint) != 0


def pack_sparse_reference(x: jax.Array, capacity: int):
    """Packs ``x`` as (mask words, first ``capacity`` nonzeros in C order, nnz).

    Returns ``(words uint32[num_words(x.size)], values x.dtype[capacity], nnz int32[])``.
    When ``nnz > capacity`` the values past ``capacity`` are dropped (overflow).
    """
    flat = jnp.ravel(x)
    mask = _nonzero_bits(flat)
    pos = jnp.cumsum(mask, dtype=jnp.int32) - 1
    # A separate reduction, not pos[-1]: XLA fuses that slice into its consumer in the
    # backward pass and keeps the whole int32 prefix sum alive until then.
    nnz = jnp.sum(mask, dtype=jnp.int32)
    idx = jnp.where(mask, pos, capacity)  # zeros go out of bounds and are dropped
    values = jnp.zeros((capacity,), x.dtype).at[idx].set(flat, mode="drop")
    return pack_mask_reference(mask), values, nnz


def unpack_sparse_reference(words: jax.Array, values: jax.Array, shape, dtype) -> jax.Array:
    """Inverse of :func:`pack_sparse_reference` (exact when nnz <= capacity)."""
    n = math.prod(shape)
    mask = unpack_mask_reference(words, n)
    pos = jnp.cumsum(mask, dtype=jnp.int32) - 1
    keep = mask & (pos < values.shape[0])  # overflowed nonzeros read as 0
    gathered = values[jnp.clip(pos, 0, values.shape[0] - 1)]
    return jnp.where(keep, gathered, jnp.zeros((), dtype)).reshape(shape)


def why_not(n: int, dtype, *, platform: str, interpret: bool) -> str | None:
    return None


REFERENCES = {"pack_mask": pack_mask_reference, "unpack_mask": unpack_mask_reference,
              "pack_sparse": pack_sparse_reference, "unpack_sparse": unpack_sparse_reference}


def run(name: str, *args, interpret: bool, **static):
    return REFERENCES[name](*args, **static)


IMPL = Implementation("reference", ANYWHERE, False, why_not, run)
