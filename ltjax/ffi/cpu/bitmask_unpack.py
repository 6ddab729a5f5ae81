"""Python twin of bitmask_unpack.cc: mask + packed values -> the dense storage matrix [C, R]."""

from __future__ import annotations

import functools

import jax


@functools.cache
def _call(target: str, shape: tuple[int, int], dtype, tile: tuple[int, int]):
    def call(mask, offsets, packed, *scales):
        out = jax.ShapeDtypeStruct(shape, dtype)
        f = jax.ffi.ffi_call(target, out, vmap_method="sequential")
        return f(mask, offsets, packed, *scales, tile_rows=int(tile[0]), tile_cols=int(tile[1]))

    return call


def bitmask_unpack(mask, offsets, packed, scales=None, *, shape, dtype, tile):
    """Dense storage [C, R] in ``dtype``; bit-exact for ``bitmask`` when ``dtype`` is the values' dtype."""
    target = "ltjax_bitmask_int8_unpack" if scales is not None else "ltjax_bitmask_unpack"
    extra = () if scales is None else (scales,)
    return _call(target, tuple(shape), jax.numpy.dtype(dtype), tuple(tile))(mask, offsets, packed, *extra)
