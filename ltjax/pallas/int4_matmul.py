"""Fused int4 dequant-matmul: ``x @ S.T`` and ``dy @ S`` over 4-bit codes ``S`` with a scale (and a min)
per group of ``G`` columns, the nibbles unpacked in registers.

Byte ``j`` of a storage row holds columns ``2j`` (low nibble) and ``2j + 1`` (high). The forward
kernel takes ``x``'s even and odd columns as two arrays (split in XLA, activations only), so the low
nibbles contract with ``x_even`` and the high ones with ``x_odd``; the transposed kernel writes the
even and odd output columns as two arrays, interleaved in XLA. A group is ``G / 2`` contiguous
bytes; the kernels walk a ``block_k`` step (a multiple of ``G``) group by group, decode its codes to
``q - 8`` in bf16 or f16 (exact; inline PTX on a GPU, `_decode.nibbles`) and scale the group's f32
partial product (forward) or the cotangent rows it contracts (transposed): every product is exact,
as in the int8 kernel. Asymmetric, ``q s + m = (q - 8) s + (m + 8 s)``: the offset multiplies x's
sum over the group (forward, in the kernel) or ``dy`` (transposed: one small f32 matmul in XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ltjax._format import CompressedTensor, decode_storage
from ltjax._numerics import split_bf16
from ltjax.pallas import _config
from ltjax.pallas._config import BlockSizes
from ltjax.pallas._decode import contract, iota, nibbles, nibbles_f32


def _both(rows_ok, g_ok, width: int):
    """The [rows, width] mask of a group's block: its rows' mask where the group exists (``g_ok``, a scalar)."""
    return jnp.broadcast_to(rows_ok[:, None] & g_ok, (rows_ok.shape[0], width))


def _contract_codes(a, codes, *, use_dot: bool, transposed: bool):
    """`contract` with decoded codes ``q - 8`` (exact in their bf16 / f16): f32 activations on the dot path
    as their three exact bf16 parts (`split_bf16`), so every product is exact, as in the int8 kernel."""
    if use_dot and a.dtype == jnp.float32:
        return sum(contract(p, codes, use_dot=True, transposed=transposed) for p in split_bf16(a))
    return contract(a.astype(codes.dtype) if use_dot else a, codes, use_dot=use_dot, transposed=transposed)


def _int4_matmul_kernel(
    xe_ref,  # (M, K/2) whole: x's even columns; read in (block_m, G/2) blocks
    xo_ref,  # (M, K/2) whole: x's odd columns; read in (block_m, G/2) blocks
    codes_ref,  # (N, K/2) uint8 whole; read in (block_n, G/2) blocks, one group each
    scales_ref,  # (N, K/G) f16; read in (block_n,) columns
    *refs,  # asymmetric: mins_ref (N, K/G) f16, read in (block_n,) columns, and xsum_ref (M, K/G) f32
    # (x's sum over each group), in (block_m,) columns; then o_ref (split, M, N), written in
    # (block_m, block_n) blocks
    shape, group, k_steps, block_sizes, cdt, asymmetric, native,
):
    (m, n, k), bs = shape, block_sizes
    mins_ref, xsum_ref, o_ref = refs if asymmetric else (None, None, *refs)
    bm, bn, bk, hg = bs.block_m, bs.block_n, bs.block_k, group // 2
    m0, r0, s = pl.program_id(0) * bm, pl.program_id(1) * bn, pl.program_id(2)
    m_ok = (m0 + iota(bm)) < m
    r_ok = (r0 + iota(bn)) < n
    k_lo = s * k_steps
    k_hi = jnp.minimum(k_lo + k_steps, pl.cdiv(k, bk))

    def group_loads(kk, g):
        """Group ``g`` of step ``kk``: its index and validity, its code bytes' columns and codes, its scale
        and, when asymmetric, its offset ``m + 8 s`` (``q s + m = (q - 8) s + m + 8 s``)."""
        gi = kk * (bk // group) + g
        g_ok = gi < k // group
        cols = pl.ds(gi * hg, hg)
        codes = plgpu.load(codes_ref.at[pl.ds(r0, bn), cols], mask=_both(r_ok, g_ok, hg), other=0)
        sc = plgpu.load(scales_ref.at[pl.ds(r0, bn), gi], mask=r_ok & g_ok, other=0.0).astype(jnp.float32)
        off = None
        if asymmetric:
            off = plgpu.load(mins_ref.at[pl.ds(r0, bn), gi], mask=r_ok & g_ok, other=0.0).astype(jnp.float32)
            off = off + 8.0 * sc
        return gi, g_ok, cols, codes, sc, off

    if bm == 1 and not _config.uses_dot(bs):
        # Batch 1: FMAs into a [bn, G/2] accumulator (a group's scale is one per row: a broadcast),
        # one reduction after the loop; codes to f32 by integer ops (`nibbles_f32`), not I2F.
        def body(kk, st):
            acc, acc_off = st
            for g in range(bk // group):
                gi, g_ok, cols, codes, sc, off = group_loads(kk, g)
                lo, hi = nibbles_f32(codes)
                x_ok = jnp.broadcast_to(g_ok, (hg,))
                xe = plgpu.load(xe_ref.at[m0, cols], mask=x_ok, other=0).astype(jnp.float32)
                xo = plgpu.load(xo_ref.at[m0, cols], mask=x_ok, other=0).astype(jnp.float32)
                acc = acc + (lo * xe[None, :] + hi * xo[None, :]) * sc[:, None]
                if asymmetric:
                    xs = plgpu.load(xsum_ref.at[m0, pl.ds(gi, 1)], mask=jnp.broadcast_to(g_ok, (1,)), other=0.0)
                    acc_off = acc_off + off * xs
            return acc, acc_off

        zeros = (jnp.zeros((bn, hg), jnp.float32), jnp.zeros((bn,), jnp.float32))
        acc, acc_off = lax.fori_loop(k_lo, k_hi, body, zeros)
        acc = (acc.sum(axis=1) + acc_off)[None, :]
    else:
        use_dot = _config.uses_dot(bs)
        code_dt = jnp.float16 if cdt == jnp.float16 else jnp.bfloat16

        def body(kk, acc):
            for g in range(bk // group):
                gi, g_ok, cols, codes, sc, off = group_loads(kk, g)
                lo, hi = nibbles(codes, code_dt, native=native)
                x_ok = _both(m_ok, g_ok, hg)
                xe = plgpu.load(xe_ref.at[pl.ds(m0, bm), cols], mask=x_ok, other=0).astype(cdt)
                xo = plgpu.load(xo_ref.at[pl.ds(m0, bm), cols], mask=x_ok, other=0).astype(cdt)
                part = (_contract_codes(xe, lo, use_dot=use_dot, transposed=False)
                        + _contract_codes(xo, hi, use_dot=use_dot, transposed=False))  # [bm, bn] f32, exact products
                acc = acc + part * sc[None, :]
                if asymmetric:
                    xs = plgpu.load(xsum_ref.at[pl.ds(m0, bm), gi], mask=m_ok & g_ok, other=0.0)
                    acc = acc + xs[:, None] * off[None, :]
            return acc

        acc = lax.fori_loop(k_lo, k_hi, body, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(o_ref.at[s, pl.ds(m0, bm), pl.ds(r0, bn)], acc.astype(o_ref.dtype), mask=m_ok[:, None] & r_ok[None, :])


def _int4_matmul_t_kernel(
    dy_ref,  # (M, N) whole; read in (block_m, block_n) blocks
    codes_ref,  # (N, K/2) uint8 whole; read in (block_n, G/2) blocks, one group each
    scales_ref,  # (N, K/G) f16; read in (block_n,) columns
    oe_ref,  # (split, M, K/2) f32: the even output columns; written in (block_m, G/2) blocks
    oo_ref,  # (split, M, K/2) f32: the odd ones
    *, shape, group, n_steps, block_sizes, cdt, native,
):
    (m, n, k), bs = shape, block_sizes
    bm, bn, bk, hg = bs.block_m, bs.block_n, bs.block_k, group // 2
    ng = bk // group
    m0, g0, s = pl.program_id(0) * bm, pl.program_id(1) * ng, pl.program_id(2)
    m_ok = (m0 + iota(bm)) < m
    use_dot = _config.uses_dot(bs)
    code_dt = jnp.float16 if cdt == jnp.float16 else jnp.bfloat16

    def body(nn, accs):
        r0 = nn * bn
        r_ok = (r0 + iota(bn)) < n
        dy = plgpu.load(dy_ref.at[pl.ds(m0, bm), pl.ds(r0, bn)], mask=m_ok[:, None] & r_ok[None, :], other=0)
        dy = dy.astype(jnp.float32)
        out = []
        for g in range(ng):
            gi = g0 + g
            g_ok = gi < k // group
            codes = plgpu.load(codes_ref.at[pl.ds(r0, bn), pl.ds(gi * hg, hg)], mask=_both(r_ok, g_ok, hg), other=0)
            sc = plgpu.load(scales_ref.at[pl.ds(r0, bn), gi], mask=r_ok & g_ok, other=0.0).astype(jnp.float32)
            lo, hi = nibbles(codes, code_dt, native=native)
            dys = (dy * sc[None, :]).astype(cdt)  # the group's scale rides on the reduced axis
            out.append(accs[2 * g] + _contract_codes(dys, lo, use_dot=use_dot, transposed=True))
            out.append(accs[2 * g + 1] + _contract_codes(dys, hi, use_dot=use_dot, transposed=True))
        return tuple(out)

    n_lo = s * n_steps
    n_hi = jnp.minimum(n_lo + n_steps, pl.cdiv(n, bn))
    accs = lax.fori_loop(n_lo, n_hi, body, (jnp.zeros((bm, hg), jnp.float32),) * (2 * ng))
    for g in range(ng):
        ok = _both(m_ok, (g0 + g) < k // group, hg)
        for half, o_ref in enumerate((oe_ref, oo_ref)):
            plgpu.store(o_ref.at[s, pl.ds(m0, bm), pl.ds((g0 + g) * hg, hg)], accs[2 * g + half], mask=ok)


@functools.partial(jax.jit, static_argnames=("transposed", "interpret", "block_sizes", "out_dtype"))
def _int4_matmul(x, ct: CompressedTensor, *, transposed: bool, interpret: bool, block_sizes: BlockSizes,
                 out_dtype=None):
    h = ct.header
    n, k = h.storage_shape
    g, asym = h.group, h.asymmetric
    m = x.shape[0]
    bs = block_sizes
    out_dtype = x.dtype if out_dtype is None else out_dtype
    out_len = k if transposed else n
    if m == 0 or n == 0 or k == 0:
        return jnp.zeros((m, out_len), out_dtype)
    reduced_steps = pl.cdiv(n, bs.block_n) if transposed else pl.cdiv(k, bs.block_k)
    split = reduced_steps if bs.split == 0 else min(bs.split, reduced_steps)
    steps = -(-reduced_steps // split)
    split = -(-reduced_steps // steps)
    cdt = _config.compute_dtype(x.dtype, jnp.int8)
    common = dict(shape=(m, n, k), group=g, block_sizes=bs, cdt=cdt, native=not interpret)
    call = functools.partial(pl.pallas_call, compiler_params=bs.compiler_params(), interpret=interpret)
    if transposed:
        halves = call(
            functools.partial(_int4_matmul_t_kernel, n_steps=steps, **common),
            out_shape=(jax.ShapeDtypeStruct((split, m, k // 2), jnp.float32),) * 2,
            grid=(pl.cdiv(m, bs.block_m), pl.cdiv(k, bs.block_k), split),
            name="ltjax_int4_matmul_t",
        )(x, ct.codes, ct.scales)
        even, odd = (o[0] if split == 1 else o.sum(axis=0) for o in halves)
        y = jnp.stack([even, odd], axis=-1).reshape(m, k)  # the even and odd columns interleaved
        if asym:  # q s + m = (q - 8) s + (m + 8 s): sum_n dy[m, n] (m + 8 s)[n, group], one small f32 matmul
            offsets = ct.mins.astype(jnp.float32) + 8.0 * ct.scales.astype(jnp.float32)
            t = jnp.dot(x.astype(jnp.float32), offsets, precision=lax.Precision.HIGHEST)
            y = y + jnp.broadcast_to(t[:, :, None], (m, k // g, g)).reshape(m, k)
        return y.astype(out_dtype)
    args = [x[:, 0::2], x[:, 1::2], ct.codes, ct.scales]
    if asym:
        args += [ct.mins, x.astype(jnp.float32).reshape(m, k // g, g).sum(axis=-1)]
    out = call(
        functools.partial(_int4_matmul_kernel, k_steps=steps, asymmetric=asym, **common),
        out_shape=jax.ShapeDtypeStruct((split, m, n), out_dtype if split == 1 else jnp.float32),
        grid=(pl.cdiv(m, bs.block_m), pl.cdiv(n, bs.block_n), split),
        name="ltjax_int4_matmul",
    )(*args)
    return out[0] if split == 1 else out.sum(axis=0).astype(out_dtype)


def _block_sizes(kernel: str, x, ct: CompressedTensor, block_sizes: BlockSizes | None) -> BlockSizes:
    bs = block_sizes or _config.get_block_sizes(kernel, x.shape[0], x.dtype)
    bs = _config.fit_group(_config.triton_only(bs, kernel), ct.header.group, explicit=block_sizes is not None)
    return _config.fit_block_m(bs, x.shape[0])


# f32 activations with at most this many rows run as the bf16 kernel over 3 M rows (below).
F32_AS_BF16_ROWS_MAX_M = 21


def int4_matmul(x, ct: CompressedTensor, *, interpret: bool | None = None, block_sizes: BlockSizes | None = None):
    """``x [M, K] @ S[N, K].T -> [M, N]`` for int4 storage ``S`` (group scales, and mins when asymmetric),
    the nibbles unpacked and scaled in registers.

    f32 ``x`` with ``M <= 21`` (unless ``block_sizes`` are given) runs as the bf16 kernel over
    ``[hi; mid; lo]``, its three exact bf16 parts (`split_bf16`) stacked as 3 M rows, with an f32
    result whose three row blocks are summed: every product stays exact, and a batch of up to 5
    rows fills the 16-row block a batch of 1 pads to anyway, where the kernel's own f32 path would
    run three dots per nibble half. Offline, sm_90: about 6 instructions per weight at M = 16 by
    the 64-row bf16 block over 48 rows, 14 by the 16-row f32 block.
    """
    interpret = _config.resolve_interpret(interpret)
    m = x.shape[0]
    if block_sizes is None and jnp.dtype(x.dtype) == jnp.float32 and 1 <= m <= F32_AS_BF16_ROWS_MAX_M:
        rows = jnp.concatenate(split_bf16(x), axis=0)
        y3 = _int4_matmul(rows, ct, transposed=False, interpret=interpret, out_dtype=jnp.dtype(jnp.float32),
                          block_sizes=_block_sizes("int4_matmul", rows, ct, None))
        return y3[:m] + y3[m:2 * m] + y3[2 * m:]
    return _int4_matmul(x, ct, transposed=False, interpret=interpret,
                        block_sizes=_block_sizes("int4_matmul", x, ct, block_sizes))


def int4_matmul_t(dy, ct: CompressedTensor, *, interpret: bool | None = None, block_sizes: BlockSizes | None = None):
    """``dy [M, N] @ S[N, K] -> [M, K]`` for int4 storage ``S``, the nibbles unpacked and scaled in registers."""
    return _int4_matmul(dy, ct, transposed=True, interpret=_config.resolve_interpret(interpret),
                        block_sizes=_block_sizes("int4_matmul_t", dy, ct, block_sizes))


def int4_matmul_reference(x, ct: CompressedTensor, *, transposed: bool = False):
    """Pure jnp: decode the storage matrix in f32 (the format's rule), one f32 matmul, cast to ``x.dtype``."""
    s = decode_storage(ct, jnp.float32)
    return jnp.dot(x.astype(jnp.float32), s if transposed else s.T,
                   precision=lax.Precision.HIGHEST).astype(x.dtype)
