"""In-register building blocks shared by the kernels: bitmask decode and the small-M contraction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def iota(n: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def popc(words: jax.Array) -> jax.Array:
    """Set bits per int32 word (`__nv_popc` on CUDA)."""
    return lax.population_count(words)


def excl_cumsum(v: jax.Array, axis: int) -> jax.Array:
    return jnp.cumsum(v, axis=axis) - v


def load_words(mask_ref, r0, r_end, w0, w_end, *, bn: int, nw: int) -> jax.Array:
    """Mask words ``[r0, r0 + bn) x [w0, w0 + nw)`` as int32, zero outside ``r < r_end, w < w_end``."""
    ok = ((r0 + iota(bn)) < r_end)[:, None] & ((w0 + iota(nw)) < w_end)[None, :]
    return plgpu.load(mask_ref.at[pl.ds(r0, bn), pl.ds(w0, nw)], mask=ok, other=0)


def row_popcounts(mask_ref, r0, r_end, w0, w_end, n_chunks, *, bn: int, nw: int) -> jax.Array:
    """Nonzeros per row in words ``[w0, min(w0 + n_chunks * nw, w_end))``: [bn] int32."""

    def body(q, acc):
        return acc + popc(load_words(mask_ref, r0, r_end, w0 + q * nw, w_end, bn=bn, nw=nw)).sum(axis=1)

    return lax.fori_loop(0, n_chunks, body, jnp.zeros((bn,), jnp.int32))


def tile_row_starts(mask_ref, offsets_ref, tile_index, carry, r0, r_end, tw0, tw_end, *, bn, nwb, n_cc, words0):
    """Packed index of each row's first nonzero in its tile (rows ``[r0, r0 + bn)``), and the rows' total.

    ``carry`` counts the tile's nonzeros in rows above ``r0``; ``words0`` are the first
    column chunk's words (the whole tile row when ``n_cc == 1``, so no second load).
    """
    if n_cc == 1:
        rowcnt = popc(words0).sum(axis=1)
    else:
        rowcnt = row_popcounts(mask_ref, r0, r_end, tw0, tw_end, n_cc, bn=bn, nw=nwb)
    start = offsets_ref[tile_index] + carry + excl_cumsum(rowcnt, axis=0)
    return start, rowcnt.sum()


def gather_packed(packed_ref, words: jax.Array, row_start: jax.Array) -> jax.Array:
    """Decodes a [bn, nw] block of mask words into the [bn, 32 nw] values they select.

    ``row_start[r]`` is the index in ``packed_ref`` of the first nonzero of row ``r`` at or
    after this block's first column. Element ``(r, 32 w + b)`` has index ``row_start[r]`` +
    popcount of words ``< w`` of its row + popcount of the bits ``< b`` of its word: no scan
    beyond the block. The packed values are gathered straight from the ref (masked, so
    absent elements read nothing and come back 0).
    """
    bn, nw = words.shape
    pc = popc(words)
    word_base = excl_cumsum(pc, axis=1)  # [bn, nw]
    bit = lax.broadcasted_iota(jnp.int32, (1, 1, 32), 2)
    w3 = words[:, :, None]
    below = popc(w3 & ((jnp.int32(1) << bit) - 1))  # [bn, nw, 32]
    idx = (row_start[:, None, None] + word_base[:, :, None] + below).reshape(bn, nw * 32)
    present = ((lax.shift_right_logical(w3, bit) & 1) != 0).reshape(bn, nw * 32)
    return plgpu.load(packed_ref.at[idx], mask=present, other=0)


def contract(a: jax.Array, b: jax.Array, *, use_dot: bool, transposed: bool) -> jax.Array:
    """f32 ``a [bm, bk] @ b[bn, bk].T`` (``transposed=False``) or ``a [bm, bn] @ b [bn, bk]``.

    ``use_dot``: Triton `tl.dot` (bm >= 16; f32 inputs at IEEE precision, not TF32); else a
    broadcast multiply-reduce in registers, the right tool for batch-1 decoding.
    """
    if use_dot:
        # Plain dot_general (not `plgpu.dot`, which newer JAX drops); HIGHEST -> IEEE f32, not TF32.
        prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
        dims = (((1,), (0 if transposed else 1,)), ((), ()))
        return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    if transposed:
        return (a32[:, :, None] * b32[None, :, :]).sum(axis=1)
    return (a32[:, None, :] * b32[None, :, :]).sum(axis=2)
