"""Bitmask / bitmask_int8 unpack to a dense storage matrix: one program per tile, popcount + prefix
offsets, no global scan."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ltjax._format import CompressedTensor, decode_storage
from ltjax.pallas import _config
from ltjax.pallas._config import BlockSizes
from ltjax.pallas._decode import gather_packed, iota, load_words, pipelined_row_walk, popc, tile_row_starts
from ltjax.pallas.bitmask_matmul import operands


def _bitmask_unpack_kernel(
    mask_ref,  # (N, W) int32 whole; read in (block_n, block_k // 32) blocks
    packed_ref,  # (nnz,) int8 codes or values, gathered element by element
    offsets_ref,  # (T_r * T_c,) int32
    scales_ref,  # (N,) f32
    o_ref,  # (N, K) dense storage, or (K, N) when ``transposed``; written in (block_n, block_k) blocks
    *, shape, tile, block_sizes, scaled, transposed,
):
    (n, k), (tr, tc), bs = shape, tile, block_sizes
    bn, bk = bs.block_n, bs.block_k
    nwb = bk // 32
    gc = pl.cdiv(k, tc)
    n_cc = pl.cdiv(tc, bk)
    i, j = pl.program_id(0), pl.program_id(1)
    rs, r_end = i * tr, jnp.minimum((i + 1) * tr, n)
    tw0 = (j * tc) // 32  # tc % 32 == 0 unless one tile spans the row
    c_end = jnp.minimum((j + 1) * tc, k)
    tw_end = pl.cdiv(c_end, 32)

    def store(r0, q, vals, scale):
        r_ok = (r0 + iota(bn)) < r_end
        if scaled:
            vals = vals.astype(jnp.float32) * scale[:, None]
        c0 = j * tc + q * bk
        ok = r_ok[:, None] & ((c0 + iota(bk)) < c_end)[None, :]
        if transposed:
            plgpu.store(o_ref.at[pl.ds(c0, bk), pl.ds(r0, bn)], vals.astype(o_ref.dtype).T, mask=ok.T)
        else:
            plgpu.store(o_ref.at[pl.ds(r0, bn), pl.ds(c0, bk)], vals.astype(o_ref.dtype), mask=ok)

    def load_scale(r0):
        r_ok = (r0 + iota(bn)) < r_end
        return plgpu.load(scales_ref.at[pl.ds(r0, bn)], mask=r_ok, other=0.0) if scaled else None

    def words_of(rc, q=0):
        return load_words(mask_ref, rs + rc * bn, r_end, tw0 + q * nwb, tw_end, bn=bn, nw=nwb)

    def starts(rc, carry, words0):
        return tile_row_starts(mask_ref, offsets_ref, i * gc + j, carry, rs + rc * bn, r_end, tw0, tw_end,
                               bn=bn, nwb=nwb, n_cc=n_cc, words0=words0)

    n_rc = pl.cdiv(r_end - rs, bn)
    if bs.num_stages > 1 and n_cc == 1:  # a tile row in one chunk: the pipelined walk
        def use(rc, vals, _):
            store(rs + rc * bn, 0, vals, load_scale(rs + rc * bn))

        pipelined_row_walk(mask_ref, offsets_ref, packed_ref, i * gc + j, (rs, r_end), (tw0, tw_end), bn=bn, nw=nwb,
                           use=use)
        return

    def row_chunk(rc, carry):
        r0 = rs + rc * bn
        words0 = words_of(rc)  # the whole tile row when n_cc == 1: one load serves the count and the decode
        start, total = starts(rc, carry, words0)
        scale = load_scale(r0)

        def col_chunk(q, start):
            words = words0 if n_cc == 1 else words_of(rc, q)
            store(r0, q, gather_packed(packed_ref, words, start), scale)
            return start + popc(words).sum(axis=1)

        if n_cc == 1:
            col_chunk(0, start)
        else:
            lax.fori_loop(0, n_cc, col_chunk, start)
        return carry + total

    lax.fori_loop(0, n_rc, row_chunk, jnp.int32(0))


@functools.partial(jax.jit, static_argnames=("interpret", "block_sizes", "dtype", "transposed"))
def _bitmask_unpack(ct: CompressedTensor, *, interpret: bool, block_sizes: BlockSizes, dtype, transposed: bool):
    n, k = ct.header.storage_shape
    out = (k, n) if transposed else (n, k)
    scaled = ct.codec == "bitmask_int8"
    if n == 0 or k == 0 or ct.nnz == 0:
        return jnp.zeros(out, dtype)
    bs = block_sizes
    if bs.block_k % 32:
        raise ValueError(f"block_k={bs.block_k} must be a multiple of 32 (whole mask words)")
    tile, args = operands(ct, bs.band_rows)
    return pl.pallas_call(
        functools.partial(_bitmask_unpack_kernel, shape=(n, k), tile=tile, block_sizes=bs, scaled=scaled,
                          transposed=transposed),
        out_shape=jax.ShapeDtypeStruct(out, dtype),
        grid=(pl.cdiv(n, tile[0]), pl.cdiv(k, tile[1])),
        compiler_params=bs.compiler_params(),
        interpret=interpret,
        name="ltjax_bitmask_unpack",
    )(*args)


def bitmask_unpack(ct: CompressedTensor, *, dtype=None, interpret: bool | None = None,
                   block_sizes: BlockSizes | None = None, transposed: bool = False):
    """The dense [N, K] storage matrix of a bitmask / bitmask_int8 tensor (``dtype`` default: its own).

    ``transposed``: its [K, N] transpose, written by the kernel (for a 2-D ``axis=1`` weight,
    the logical tensor itself, with no transpose pass over the dense output).
    """
    kernel = "bitmask_unpack_t" if transposed else "bitmask_unpack"
    return _bitmask_unpack(ct, interpret=_config.resolve_interpret(interpret),
                           block_sizes=_config.triton_only(block_sizes or _config.get_block_sizes(kernel, 1), kernel),
                           dtype=jnp.dtype(ct.dtype if dtype is None else dtype), transposed=transposed)


def bitmask_unpack_reference(ct: CompressedTensor, *, dtype=None):
    """Pure jnp: the format's reference decoder of the storage matrix."""
    return decode_storage(ct, dtype)
