"""What the XLA implementations and the VJPs of several ops share: the in-place bitmask decode,
the per-row decode that fuses into a reduction, and the cotangent of a `CompressedTensor`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ltjax._format import CompressedTensor, Header, int4_dequantize, int4_nibbles

# The XLA path's contractions are f32 by contract: on GPU a plain f32 dot runs in TF32 (about
# 1e-3 relative), ten times the error budget the codecs are measured against.
F32 = lax.Precision.HIGHEST


def has_scales(ct: CompressedTensor) -> bool:
    return ct.codec in ("int8", "bitmask_int8")


def word_base(h: Header, mask: jax.Array, offsets: jax.Array) -> jax.Array:
    """int32 [C, W]: the packed index of the first nonzero at or after each mask word.

    An exclusive prefix of per-word popcounts in packed (tile-major, row-major in tile) order,
    plus the tile's stored offset; 1/32 of the elements, so cheap to materialise.
    """
    (c, _), (tr, tc) = h.storage_shape, h.tile
    gr, gc = h.tile_grid
    w, wpt = h.mask_words, -(-tc // 32)
    pc = lax.population_count(mask).astype(jnp.int32)
    p = jnp.pad(pc, ((0, gr * tr - c), (0, gc * wpt - w)))
    p = p.reshape(gr, tr, gc, wpt).transpose(0, 2, 1, 3).reshape(gr, gc, tr * wpt)
    base = jnp.cumsum(p, axis=-1) - p + offsets.astype(jnp.int32).reshape(gr, gc, 1)
    return base.reshape(gr, gc, tr, wpt).transpose(0, 2, 1, 3).reshape(gr * tr, gc * wpt)[:c, :w]


def bits_and_index(mask_rows: jax.Array, base_rows: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """Per element of some rows: (is-nonzero bool [n, r], packed index int32 [n, r]). Elementwise."""
    n, w = mask_rows.shape
    sh = jnp.arange(32, dtype=jnp.uint32)
    words = mask_rows[:, :, None]
    bits = ((words >> sh) & jnp.uint32(1)).astype(bool)
    below = lax.population_count(words & ((jnp.uint32(1) << sh) - jnp.uint32(1))).astype(jnp.int32)
    idx = base_rows[:, :, None] + below
    return bits.reshape(n, w * 32)[:, :r], idx.reshape(n, w * 32)[:, :r]


def base_of(ct: CompressedTensor) -> jax.Array | None:
    """`word_base` for the bitmask codecs, None for the others."""
    if ct.codec in ("bitmask", "bitmask_int8"):
        return word_base(ct.header, ct.mask, ct.offsets)
    return None


def decode_rows(ct: CompressedTensor, base: jax.Array | None, start: Any, size: int) -> jax.Array:
    """Rows ``[start, start+size)`` of the storage matrix, as f32 (fusable): before the per-channel
    scale for the codecs that have one (`has_scales`), decoded whole for int4 (its scales vary
    along the row). ``start`` may be traced (a loop counter); ``base`` is `base_of(ct)`.
    """
    h = ct.header
    r = h.storage_shape[1]
    if h.codec == "int4":
        rows = lambda a: lax.dynamic_slice_in_dim(a, start, size, 0)  # noqa: E731
        return int4_dequantize(h, rows(ct.codes), rows(ct.scales), None if ct.mins is None else rows(ct.mins))
    if h.codec in ("raw", "int8"):
        a = ct.values if h.codec == "raw" else ct.codes
        return lax.dynamic_slice_in_dim(a, start, size, 0).astype(jnp.float32)
    packed = ct.values if h.codec == "bitmask" else ct.codes
    if packed.shape[0] == 0:
        return jnp.zeros((size, r), jnp.float32)
    bits, idx = bits_and_index(
        lax.dynamic_slice_in_dim(ct.mask, start, size, 0), lax.dynamic_slice_in_dim(base, start, size, 0), r
    )
    vals = jnp.take(packed, jnp.clip(idx, 0, packed.shape[0] - 1), axis=0, mode="clip")
    return jnp.where(bits, vals.astype(jnp.float32), 0.0)


def int4_grads(ct: CompressedTensor, g_rows) -> dict[str, jax.Array]:
    """Cotangents of an int4 tensor's ``scales`` (and ``mins``) given ``g_rows(start, size)``, the
    f32 cotangent of storage rows ``[start, start+size)``: computed chunk by chunk over the rows, so
    no dense ``[C, R]`` cotangent exists at once."""
    h = ct.header
    (c, r), gsz = h.storage_shape, h.group

    def chunk(start, size):
        gw = g_rows(start, size).reshape(size, r // gsz, gsz)
        q = int4_nibbles(lax.dynamic_slice_in_dim(ct.codes, start, size, 0)).astype(jnp.float32)
        q = q.reshape(size, r // gsz, gsz)
        out = {"scales": jnp.sum(gw * (q if h.asymmetric else q - 8.0), axis=-1)}
        if h.asymmetric:
            out["mins"] = jnp.sum(gw, axis=-1)
        return out

    rows = max(1, min(c, 128))
    nb, rem = c // rows, c % rows
    parts = lax.map(lambda i: chunk(i * rows, rows), jnp.arange(nb, dtype=jnp.int32)) if nb else {}
    tail = chunk(nb * rows, rem) if rem else {}
    fields = ("scales", "mins") if h.asymmetric else ("scales",)
    return {f: jnp.concatenate(([parts[f].reshape(nb * rows, -1)] if nb else []) + ([tail[f]] if rem else []),
                               axis=0).astype(getattr(ct, f).dtype) for f in fields}


def packed_positions(ct: CompressedTensor) -> tuple[jax.Array, jax.Array]:
    """(row, col) int32 ``[nnz]`` storage position of each packed value of a bitmask codec."""
    h = ct.header
    c, r = h.storage_shape
    nnz = (ct.values if h.codec == "bitmask" else ct.codes).shape[0]
    bits, idx = bits_and_index(ct.mask, word_base(h, ct.mask, ct.offsets), r)
    target = jnp.where(bits, idx, nnz).reshape(-1)  # out of range → dropped
    flat = jnp.zeros((nnz,), jnp.int32).at[target].set(jnp.arange(c * r, dtype=jnp.int32), mode="drop")
    return flat // max(r, 1), flat % max(r, 1)


def float_leaves(ct: CompressedTensor) -> dict[str, Any]:
    """The leaves of ``ct`` that get real cotangents (scales, float values)."""
    return {f: a for f, a in ct.leaves().items() if jnp.issubdtype(a.dtype, jnp.floating)}


def cotangent(ct: CompressedTensor, **float_cots: Any) -> CompressedTensor:
    """A CompressedTensor-shaped cotangent: the given float leaves (zeros for the others), float0
    zeros for the integer leaves (codes, mask, offsets, checksums, row_starts)."""
    leaves = {}
    for f, a in ct.leaves().items():
        if f in float_cots:
            leaves[f] = float_cots[f]
        elif jnp.issubdtype(a.dtype, jnp.floating):
            leaves[f] = jnp.zeros(a.shape, a.dtype)
        else:
            leaves[f] = np.zeros(np.shape(a), dtype=jax.dtypes.float0)
    return dataclasses.replace(ct, **leaves)
