"""In-register building blocks shared by the kernels: bitmask decode and the small-M contraction;
and `row_bands`, the one piece that runs in XLA before a bitmask kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ltjax._format import row_starts
from ltjax._numerics import split_bf16


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


def row_bands(ct, band_rows: int):
    """The tile grid a bitmask kernel walks, and its offsets: the stored one, or each stored tile cut into
    row bands of ``band_rows`` rows (in XLA, before the kernel).

    A band's packed values are contiguous (a tile stores its values row by row), so a band is a
    tile of its own to the kernels: a program per band walks ``band_rows`` rows instead of the
    tile's, with no count of the rows above it to take. Its start is its first row's
    (`ltjax._format.row_starts`: one popcount pass over the mask words, or none where ``ct``
    carries them, `ltjax.index_rows`). Only where ``band_rows`` divides the tile's rows (and is
    smaller); else the stored grid. Returns ``((rows, cols), offsets)``, offsets flat in
    band-row-major order.
    """
    h = ct.header
    (n, _), (tr, tc) = h.storage_shape, h.tile
    if band_rows <= 0 or band_rows >= tr or tr % band_rows:
        return h.tile, ct.offsets
    gc = h.tile_grid[1]
    return (band_rows, tc), row_starts(ct).reshape(n, gc)[::band_rows].reshape(-1)


def gather_packed(packed_ref, words: jax.Array, row_start: jax.Array) -> jax.Array:
    """Decodes a [bn, nw] block of mask words into the [bn, 32 nw] values they select.

    ``row_start[r]`` is the index in ``packed_ref`` of the first nonzero of row ``r`` at or
    after this block's first column. Element ``(r, 32 w + b)`` has index ``row_start[r]`` +
    popcount of words ``< w`` of its row + popcount of the bits ``< b`` of its word: no scan
    beyond the block. The packed values are gathered straight from the ref (masked, so
    absent elements read nothing and come back 0).
    """
    bn, nw = words.shape
    word_start = row_start[:, None] + excl_cumsum(popc(words), axis=1)  # [bn, nw]: per word, not per bit
    one = jnp.int32(1) << lax.broadcasted_iota(jnp.int32, (1, 1, 32), 2)  # loop-invariant bit masks
    w3 = words[:, :, None]
    # Per element: an AND, a popcount and an add for the index, an AND and a compare for the mask.
    idx = (word_start[:, :, None] + popc(w3 & (one - 1))).reshape(bn, nw * 32)
    present = ((w3 & one) != 0).reshape(bn, nw * 32)
    return plgpu.load(packed_ref.at[idx], mask=present, other=0)


def pipelined_row_walk(mask_ref, offsets_ref, packed_ref, tile_index, rows, words, *, bn: int, nw: int, use,
                       acc=None):
    """Walks the row chunks of tile ``tile_index``, software-pipelined: ``acc = use(rc, vals, acc)``
    for each chunk in order (``vals``: its `gather_packed` values); returns the final ``acc``.

    ``rows = (rs, r_end)``: the tile's storage rows, walked ``bn`` at a time; ``words = (w0,
    w_end)``: its mask words, all of which fit one chunk (``nw`` words). Iteration ``rc`` uses chunk
    ``rc`` (gathered in iteration ``rc - 1``), gathers chunk ``rc + 1`` (its words loaded in
    iteration ``rc - 1``) and loads chunk ``rc + 2``'s words, so no global load is waited on in the
    iteration that issued it. Chunks past the tile's end read all-zero words and gather nothing.
    The bitmask kernels take it when ``num_stages > 1`` (their loads are gathers, which Triton's
    own pipeliner cannot stage).
    """
    (rs, r_end), (w0, w_end) = rows, words
    words_of = lambda rc: load_words(mask_ref, rs + rc * bn, r_end, w0, w_end, bn=bn, nw=nw)
    starts = lambda rc, carry, wds: tile_row_starts(mask_ref, offsets_ref, tile_index, carry, rs + rc * bn, r_end,
                                                    w0, w_end, bn=bn, nwb=nw, n_cc=1, words0=wds)
    first = words_of(0)
    s0, t0 = starts(0, 0, first)

    def step(rc, state):
        vals, words_next, carry, acc = state  # carry: the tile's nonzeros in rows above chunk rc + 1
        words_after = words_of(rc + 2)
        start, total = starts(rc + 1, carry, words_next)
        vals_next = gather_packed(packed_ref, words_next, start)
        return vals_next, words_after, carry + total, use(rc, vals, acc)

    n_rc = pl.cdiv(r_end - rs, bn)
    return lax.fori_loop(0, n_rc, step, (gather_packed(packed_ref, first, s0), words_of(1), t0, acc))[3]


def i8_to_f32(codes: jax.Array) -> jax.Array:
    """int8 -> f32 exactly, with integer and float adds instead of `I2F` (a quarter-rate unit on
    Hopper): the bits ``0x4B000080 + c`` are the float ``2^23 + 128 + c``."""
    bits = codes.astype(jnp.int32) + jnp.int32(0x4B000080)
    return lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(8388736.0)


def to_f32(v: jax.Array) -> jax.Array:
    """Decoded weights (int8 codes or float values) as f32: codes by `i8_to_f32`, not `I2F` (nor a bf16 round trip)."""
    return i8_to_f32(v) if v.dtype == jnp.int8 else v.astype(jnp.float32)


def contract(a: jax.Array, b: jax.Array, *, use_dot: bool, transposed: bool, split_f32: bool = True) -> jax.Array:
    """f32 ``a [bm, bk] @ b[bn, bk].T`` (``transposed=False``) or ``a [bm, bn] @ b [bn, bk]``.

    One operand holds activations (f32, bf16 or f16), the other decoded weights: int8 codes
    (either side) or float values (``b``). ``use_dot``: Triton `tl.dot` on the tensor cores
    (every dimension >= 16). Codes are exact in bf16 and f16, so with f32 activations and
    ``split_f32`` the dot runs as three bf16 dots over the activations' hi/mid/lo split:
    f32-accurate (each product exact, f32 accumulation) on the tensor cores. Otherwise f32
    activations take the IEEE f32 dot (HIGHEST, not TF32) on the FMA units. On an H200 the split
    made the int8 kernel several times faster but the bitmask one, bound by its decode, slower
    and spilling registers (`docs/pallas.md`), so it passes False.
    Else a broadcast multiply-reduce in f32 registers.
    """
    if use_dot:
        dims = (((1,), (0 if transposed else 1,)), ((), ()))
        dot = lambda u, v, prec=None: lax.dot_general(u, v, dims, precision=prec, preferred_element_type=jnp.float32)
        codes_in_a = a.dtype == jnp.int8
        act = b if codes_in_a else a
        if split_f32 and (codes_in_a or b.dtype == jnp.int8) and act.dtype == jnp.float32:
            codes = (a if codes_in_a else b).astype(jnp.bfloat16)
            parts = split_bf16(act)
            return sum(dot(codes, t) if codes_in_a else dot(t, codes) for t in parts)
        a, b = a.astype(act.dtype), b.astype(act.dtype)
        # Plain dot_general (not `plgpu.dot`, which newer JAX drops); HIGHEST -> IEEE f32, not TF32.
        return dot(a, b, lax.Precision.HIGHEST if act.dtype == jnp.float32 else None)
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    if transposed:
        return (a32[:, :, None] * b32[None, :, :]).sum(axis=1)
    return (a32[:, None, :] * b32[None, :, :]).sum(axis=2)





# int4 codes to 16-bit floats: a nibble q OR-ed into the mantissa of MAGIC (bits) is the float
# MAGIC + q, exactly; one FMA (times 1, plus -(MAGIC + 8)) leaves q - 8. Per dtype: (MAGIC bits and
# its value, the packed pair 1.0, the packed pair -(MAGIC + 8), PTX type).
_NIBBLE_FLOAT = {
    jnp.dtype(jnp.bfloat16): (0x4300, 128.0, 0x3F803F80, 0xC308C308, "bf16x2"),  # 128 + q: 7 mantissa bits
    jnp.dtype(jnp.float16): (0x6400, 1024.0, 0x3C003C00, 0xE408E408, "f16x2"),  # 1024 + q: 10 mantissa bits
}


def _nibble_ptx(shift: int, dtype) -> str:
    """PTX taking four code bytes (one register, byte i = element i) to the four ``q - 8`` of their low
    (``shift`` 0) or high (4) nibbles as two packed 16-bit float pairs: 2 PRMT, 2 LOP3, 2 FMA (and a
    shift) per 4 elements, against about 4 instructions per element for the same in jnp."""
    magic, _, one, bias, ty = _NIBBLE_FLOAT[jnp.dtype(dtype)]
    return f"""{{
.reg .b32 w, t0, t1, one, bias;
mov.b32 one, {one:#010x};
mov.b32 bias, {bias:#010x};
shr.b32 w, $2, {shift};
prmt.b32 t0, w, 0, 0x4140;
prmt.b32 t1, w, 0, 0x4342;
lop3.b32 t0, t0, 0x000f000f, {magic * 0x10001:#010x}, 0xea;
lop3.b32 t1, t1, 0x000f000f, {magic * 0x10001:#010x}, 0xea;
fma.rn.{ty} $0, t0, one, bias;
fma.rn.{ty} $1, t1, one, bias;
}}"""


def nibbles(codes: jax.Array, dtype, *, native: bool) -> tuple[jax.Array, jax.Array]:
    """int4 code bytes (uint8, two codes ``q`` a byte) -> ``q - 8`` of the low and the high nibbles in
    ``dtype`` (bf16 or f16: exact), each of the byte array's shape.

    ``native`` (a GPU kernel): inline PTX on four bytes at once (`_nibble_ptx`); jnp's integer ops on
    bytes compile to per-byte extract / shift / repack sequences. Otherwise (interpret mode, which
    has no inline assembly) the same recipe element by element in jnp.
    """
    magic, magic_value, *_ = _NIBBLE_FLOAT[jnp.dtype(dtype)]
    if native:
        out = jax.ShapeDtypeStruct(codes.shape, dtype)
        f = lambda shift: plgpu.elementwise_inline_asm(_nibble_ptx(shift, dtype), args=[codes], constraints="=r,=r,r",
                                                       pack=4, result_shape_dtypes=[out])[0]
        return f(0), f(4)
    c = codes.astype(jnp.uint16)
    f = lambda q: (lax.bitcast_convert_type(q | jnp.uint16(magic), dtype).astype(jnp.float32)
                   - (magic_value + 8.0)).astype(dtype)
    return f(c & 15), f(c >> 4)


def nibbles_f32(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``q - 8`` of the low and the high nibble as f32, with integer ops and one float subtract each instead
    of `I2F`: the bits ``0x4B000000 | q`` are the float ``2^23 + q``."""
    c = codes.astype(jnp.int32)
    f = lambda q: lax.bitcast_convert_type(q | jnp.int32(0x4B000000), jnp.float32) - jnp.float32(8388616.0)
    return f(c & 15), f(c >> 4)
