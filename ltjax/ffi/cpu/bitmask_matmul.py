"""Python twin of bitmask_matmul.cc: fused matmuls over the bitmask and bitmask_int8 codecs."""

from __future__ import annotations

import functools

import jax

from ltjax.ffi.cpu._batching import fold_batch


@functools.cache
def _call(target: str, transposed: bool, k: int, tile: tuple[int, int]):
    def call(a, mask, offsets, packed, *scales):
        n = mask.shape[0]
        shape = (a.shape[0], k) if transposed else (a.shape[0], n)
        out = jax.ShapeDtypeStruct(shape, a.dtype)
        f = jax.ffi.ffi_call(target, out, vmap_method="sequential")
        return f(a, mask, offsets, packed, *scales, tile_rows=int(tile[0]), tile_cols=int(tile[1]))

    return fold_batch(call)


def bitmask_matmul(x2, mask, offsets, packed, scales=None, *, tile):
    """y[M, N] = x2[M, K] @ W.T, W [N, K] from the mask + tile-major packed values (× scales if int8)."""
    target = "ltjax_bitmask_int8_matmul" if scales is not None else "ltjax_bitmask_matmul"
    extra = () if scales is None else (scales,)
    return _call(target, False, x2.shape[-1], tuple(tile))(x2, mask, offsets, packed, *extra)


def bitmask_matmul_t(dy2, mask, offsets, packed, scales=None, *, k, tile):
    """dx[M, K] = dy2[M, N] @ W; the backward for x."""
    target = "ltjax_bitmask_int8_matmul_t" if scales is not None else "ltjax_bitmask_matmul_t"
    extra = () if scales is None else (scales,)
    return _call(target, True, int(k), tuple(tile))(dy2, mask, offsets, packed, *extra)
