"""Fused bitmask / bitmask_int8 decode-matmul: ``x @ S.T`` and ``dy @ S`` over the packed storage ``S``,
decoded in registers."""

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
from ltjax.pallas._decode import (
    contract,
    gather_packed,
    iota,
    load_words,
    pipelined_row_walk,
    popc,
    row_bands,
    row_popcounts,
    tile_row_starts,
    to_f32,
)


def _bitmask_matmul_kernel(
    x_ref,  # (M, K) whole; read in (block_m, block_k) blocks
    mask_ref,  # (N, W) int32 whole; read in (block_n, block_k // 32) blocks
    packed_ref,  # (nnz,) int8 codes or values, gathered element by element
    offsets_ref,  # (T_r * T_c,) int32
    scales_ref,  # (N,) f32
    o_ref,  # (split, M, N); written in (block_m, block_n) blocks
    *, shape, tile, groups, block_sizes, cdt,
):
    (m, n, k), (tr, tc), bs = shape, tile, block_sizes
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    nwb = bk // 32
    gc = pl.cdiv(k, tc)
    n_cc = pl.cdiv(tc, bk)  # column chunks per tile
    m0, i, s = pl.program_id(0) * bm, pl.program_id(1), pl.program_id(2)
    rs, r_end = i * tr, jnp.minimum((i + 1) * tr, n)
    j_lo = s * groups
    n_j = jnp.minimum(groups, gc - j_lo)
    gp = _config.next_pow2(groups)
    mrow_ok = (m0 + iota(bm)) < m
    use_dot = _config.uses_dot(bs)
    # The broadcast path (no `tl.dot`) multiplies in f32: activations converted once as loaded, codes
    # straight to f32 (`to_f32`), not through the compute dtype.
    decoded = (lambda v: v.astype(cdt)) if use_dot else to_f32

    def load_x(c0, c_end):
        x_ok = mrow_ok[:, None] & ((c0 + iota(bk)) < c_end)[None, :]
        x = plgpu.load(x_ref.at[pl.ds(m0, bm), pl.ds(c0, bk)], mask=x_ok, other=0)
        return x.astype(cdt if use_dot else jnp.float32)

    def store(r0, acc):
        r_ok = (r0 + iota(bn)) < r_end
        scale = plgpu.load(scales_ref.at[pl.ds(r0, bn)], mask=r_ok, other=0.0)
        plgpu.store(o_ref.at[s, pl.ds(m0, bm), pl.ds(r0, bn)], (acc * scale[None, :]).astype(o_ref.dtype),
                    mask=mrow_ok[:, None] & r_ok[None, :])

    def dot(x, vals):
        return contract(x, decoded(vals), use_dot=use_dot, transposed=False, split_f32=False)

    if bs.num_stages > 1 and groups == 1 and n_cc == 1:
        # One tile per program and a tile row in one chunk: the pipelined walk (`_decode`); the
        # activation block is the same for every chunk, so it is loaded once.
        j = s
        tw0, c_end = (j * tc) // 32, jnp.minimum((j + 1) * tc, k)
        tw_end = pl.cdiv(c_end, 32)
        x = load_x(j * tc, c_end)

        def use(rc, vals, _):
            store(rs + rc * bn, dot(x, vals))

        pipelined_row_walk(mask_ref, offsets_ref, packed_ref, i * gc + j, (rs, r_end), (tw0, tw_end), bn=bn, nw=nwb,
                           use=use)
        return

    def row_chunk(rc, carries):  # carries[jj]: nonzeros of tile (i, j_lo + jj) above this chunk
        r0 = rs + rc * bn

        def tile_col(jj, state):
            acc, carries = state
            j = j_lo + jj
            tw0, c_end = (j * tc) // 32, jnp.minimum((j + 1) * tc, k)
            tw_end = pl.cdiv(c_end, 32)
            words0 = load_words(mask_ref, r0, r_end, tw0, tw_end, bn=bn, nw=nwb)
            carry = jnp.where(iota(gp) == jj, carries, 0).sum()
            start, total = tile_row_starts(mask_ref, offsets_ref, i * gc + j, carry, r0, r_end, tw0, tw_end,
                                            bn=bn, nwb=nwb, n_cc=n_cc, words0=words0)
            carries = jnp.where(iota(gp) == jj, carries + total, carries)

            def col_chunk(q, st):
                acc, start = st
                words = words0 if n_cc == 1 else load_words(mask_ref, r0, r_end, tw0 + q * nwb, tw_end, bn=bn, nw=nwb)
                vals = decoded(gather_packed(packed_ref, words, start))  # cast before the x load (registers)
                acc = acc + dot(load_x(j * tc + q * bk, c_end), vals)
                return acc, start + popc(words).sum(axis=1)

            if n_cc == 1:
                acc, _ = col_chunk(0, (acc, start))
            else:
                acc, _ = lax.fori_loop(0, n_cc, col_chunk, (acc, start))
            return acc, carries

        acc, carries = lax.fori_loop(0, n_j, tile_col, (jnp.zeros((bm, bn), jnp.float32), carries))
        store(r0, acc)
        return carries

    lax.fori_loop(0, pl.cdiv(r_end - rs, bn), row_chunk, jnp.zeros((gp,), jnp.int32))


def _bitmask_matmul_t_kernel(
    dy_ref,  # (M, N) whole; read in (block_m, block_n) blocks
    mask_ref,  # (N, W) int32 whole; read in (block_n, block_k // 32) blocks
    packed_ref,  # (nnz,) int8 codes or values, gathered element by element
    offsets_ref,  # (T_r * T_c,) int32
    scales_ref,  # (N,) f32
    o_ref,  # (split, M, K); written in (block_m, block_k) blocks
    *, shape, tile, groups, block_sizes, cdt,
):
    (m, n, k), (tr, tc), bs = shape, tile, block_sizes
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    nwb = bk // 32
    gr, gc = pl.cdiv(n, tr), pl.cdiv(k, tc)
    n_cc = pl.cdiv(tc, bk)
    m0, j, s = pl.program_id(0) * bm, pl.program_id(1), pl.program_id(2)
    tw0 = (j * tc) // 32  # tc % 32 == 0 unless one tile spans the row
    c_end = jnp.minimum((j + 1) * tc, k)
    tw_end = pl.cdiv(c_end, 32)
    i_lo = s * groups
    n_i = jnp.minimum(groups, gr - i_lo)
    mrow_ok = (m0 + iota(bm)) < m
    use_dot = _config.uses_dot(bs)
    decoded = (lambda v: v.astype(cdt)) if use_dot else to_f32  # as in the forward kernel

    def dys_of(r0, r_end):  # dy block times the rows' scales: the compute dtype, f32 on the broadcast path
        r_ok = (r0 + iota(bn)) < r_end
        dy = plgpu.load(dy_ref.at[pl.ds(m0, bm), pl.ds(r0, bn)], mask=mrow_ok[:, None] & r_ok[None, :],
                        other=0).astype(jnp.float32)
        scale = plgpu.load(scales_ref.at[pl.ds(r0, bn)], mask=r_ok, other=0.0)
        return (dy * scale[None, :]).astype(cdt if use_dot else jnp.float32)

    def dot(dys, vals):
        return contract(dys, decoded(vals), use_dot=use_dot, transposed=True, split_f32=False)

    def col_chunk(q, _):
        c0 = j * tc + q * bk
        wq0 = tw0 + q * nwb

        def tile_row(ii, acc):
            i = i_lo + ii
            rs, r_end = i * tr, jnp.minimum((i + 1) * tr, n)
            if bs.num_stages > 1 and n_cc == 1:  # a tile row in one chunk: the pipelined walk (`_decode`)
                return pipelined_row_walk(
                    mask_ref, offsets_ref, packed_ref, i * gc + j, (rs, r_end), (tw0, tw_end), bn=bn, nw=nwb,
                    use=lambda rc, vals, acc: acc + dot(dys_of(rs + rc * bn, r_end), vals), acc=acc)

            def row_chunk(rc, st):
                acc, carry = st
                r0 = rs + rc * bn
                words = load_words(mask_ref, r0, r_end, wq0, tw_end, bn=bn, nw=nwb)
                if n_cc == 1:
                    start, total = tile_row_starts(mask_ref, offsets_ref, i * gc + j, carry, r0, r_end, tw0, tw_end,
                                                    bn=bn, nwb=nwb, n_cc=1, words0=words)
                else:
                    start, total = tile_row_starts(mask_ref, offsets_ref, i * gc + j, carry, r0, r_end, tw0, tw_end,
                                                    bn=bn, nwb=nwb, n_cc=n_cc, words0=None)
                    start = start + row_popcounts(mask_ref, r0, r_end, tw0, tw_end, q, bn=bn, nw=nwb)
                vals = decoded(gather_packed(packed_ref, words, start))  # cast before the dy loads (registers)
                return acc + dot(dys_of(r0, r_end), vals), carry + total

            acc, _ = lax.fori_loop(0, pl.cdiv(r_end - rs, bn), row_chunk, (acc, jnp.int32(0)))
            return acc

        acc = lax.fori_loop(0, n_i, tile_row, jnp.zeros((bm, bk), jnp.float32))
        c_ok = (c0 + iota(bk)) < jnp.minimum(c_end, c0 + bk)
        plgpu.store(o_ref.at[s, pl.ds(m0, bm), pl.ds(c0, bk)], acc.astype(o_ref.dtype),
                 mask=mrow_ok[:, None] & c_ok[None, :])
        return 0

    lax.fori_loop(0, n_cc, col_chunk, 0)


def operands(ct: CompressedTensor, band_rows: int):
    """``(tile, (mask, packed, offsets, scales))`` a bitmask kernel takes: mask words as int32, the
    packed codes or values, the offsets of the tile grid it walks (`_decode.row_bands`), scales
    (ones for ``bitmask``)."""
    h = ct.header
    packed = ct.codes if ct.codec == "bitmask_int8" else ct.values
    scales = ct.scales if ct.codec == "bitmask_int8" else jnp.ones((h.storage_shape[0],), jnp.float32)
    mask = lax.bitcast_convert_type(ct.mask, jnp.int32)
    tile, offsets = row_bands(ct, band_rows)
    return tile, (mask, packed, offsets, scales)


def _check_blocks(ct: CompressedTensor, bs: BlockSizes) -> None:
    if bs.block_k % 32:
        raise ValueError(f"block_k={bs.block_k} must be a multiple of 32 (whole mask words) for codec {ct.codec!r}")


@functools.partial(jax.jit, static_argnames=("transposed", "interpret", "block_sizes", "out_dtype"))
def _bitmask_matmul(x, ct: CompressedTensor, *, transposed: bool, interpret: bool, block_sizes: BlockSizes,
                    out_dtype=None):
    n, k = ct.header.storage_shape
    m = x.shape[0]
    out_len = k if transposed else n
    packed_len = (ct.codes if ct.codec == "bitmask_int8" else ct.values).shape[0]
    result_dtype = jnp.dtype(out_dtype or x.dtype)
    if m == 0 or packed_len == 0:
        return jnp.zeros((m, out_len), result_dtype)
    bs = block_sizes
    _check_blocks(ct, bs)
    tile, args = operands(ct, bs.band_rows)
    gr, gc = pl.cdiv(n, tile[0]), pl.cdiv(k, tile[1])
    n_groups = gr if transposed else gc  # tiles along the reduced axis
    split = n_groups if bs.split == 0 else min(bs.split, n_groups)
    groups = -(-n_groups // split)
    split = -(-n_groups // groups)
    part_dtype = result_dtype if split == 1 else jnp.float32
    cdt = _config.compute_dtype(x.dtype, (ct.codes if ct.codec == "bitmask_int8" else ct.values).dtype)
    kernel = _bitmask_matmul_t_kernel if transposed else _bitmask_matmul_kernel
    name = "ltjax_bitmask_matmul_t" if transposed else "ltjax_bitmask_matmul"
    out = pl.pallas_call(
        functools.partial(kernel, shape=(m, n, k), tile=tile, groups=groups, block_sizes=bs, cdt=cdt),
        out_shape=jax.ShapeDtypeStruct((split, m, out_len), part_dtype),
        grid=(pl.cdiv(m, bs.block_m), gc if transposed else gr, split),
        compiler_params=bs.compiler_params(),
        interpret=interpret,
        name=name,
    )(x, *args)
    return out[0] if split == 1 else out.sum(axis=0).astype(result_dtype)


def bitmask_matmul(x, ct: CompressedTensor, *, interpret: bool | None = None, block_sizes: BlockSizes | None = None,
                   out_dtype=None):
    """``x [M, K] @ S[N, K].T -> [M, N]`` for a bitmask / bitmask_int8 storage matrix ``S``, decoded in registers
    (result in ``out_dtype``, default ``x.dtype``; f32 accumulation either way)."""
    bs = _config.triton_only(block_sizes or _config.get_block_sizes("bitmask_matmul", x.shape[0], x.dtype),
                             "bitmask_matmul")
    return _bitmask_matmul(x, ct, transposed=False, interpret=_config.resolve_interpret(interpret),
                           block_sizes=_config.fit_block_m(bs, x.shape[0]), out_dtype=out_dtype)


def bitmask_matmul_t(dy, ct: CompressedTensor, *, interpret: bool | None = None,
                     block_sizes: BlockSizes | None = None, out_dtype=None):
    """``dy [M, N] @ S[N, K] -> [M, K]`` for a bitmask / bitmask_int8 storage matrix ``S``, decoded in registers."""
    bs = _config.triton_only(block_sizes or _config.get_block_sizes("bitmask_matmul_t", dy.shape[0], dy.dtype),
                             "bitmask_matmul_t")
    return _bitmask_matmul(dy, ct, transposed=True, interpret=_config.resolve_interpret(interpret),
                           block_sizes=_config.fit_block_m(bs, dy.shape[0]), out_dtype=out_dtype)


def bitmask_matmul_reference(x, ct: CompressedTensor, *, transposed: bool = False):
    """Pure jnp: the storage matrix decoded by the format's reference decoder, then one f32 matmul."""
    s = decode_storage(ct, jnp.float32)
    y = x.astype(jnp.float32) @ (s if transposed else s.T)
    return y.astype(x.dtype)
