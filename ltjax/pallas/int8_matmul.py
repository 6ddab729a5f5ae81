"""Fused int8 dequant-matmul: ``x @ S.T`` and ``dy @ S`` over int8 codes ``S`` with per-row scales,
dequantised in registers."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ltjax._config import log_once
from ltjax._format import CompressedTensor, decode_storage
from ltjax.pallas import _config
from ltjax.pallas._config import BlockSizes
from ltjax.pallas._decode import contract, i8_to_f32, iota
from ltjax.pallas.int8_matmul_mosaic import mosaic_matmul, why_not_mosaic


def _int8_matmul_kernel(
    x_ref,  # (M, K) whole; read in (block_m, block_k) blocks
    codes_ref,  # (N, K) int8 whole; read in (block_n, block_k) blocks
    scales_ref,  # (N,) f32; read in (block_n,) blocks
    o_ref,  # (split, M, N); written in (block_m, block_n) blocks
    *, shape, k_steps, block_sizes, cdt,
):
    (m, n, k), bs = shape, block_sizes
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    m0, r0, s = pl.program_id(0) * bm, pl.program_id(1) * bn, pl.program_id(2)
    m_ok = (m0 + iota(bm)) < m
    r_ok = (r0 + iota(bn)) < n

    use_dot = _config.uses_dot(bs)
    k_lo = s * k_steps
    k_hi = jnp.minimum(k_lo + k_steps, pl.cdiv(k, bk))

    if not use_dot and bm == 1:
        # Batch 1 on the broadcast path: FMAs into a [bn, bk] accumulator, one reduction after the
        # loop; x read as a row vector (the weight block's own column layout, no shuffle); with
        # num_stages > 1 the next block's loads are issued before this block's FMAs.
        def load(kk):
            c0 = kk * bk
            ok = ((c0 + iota(bk)) < k) & (kk < k_hi)
            w = plgpu.load(codes_ref.at[pl.ds(r0, bn), pl.ds(c0, bk)], mask=r_ok[:, None] & ok[None, :], other=0)
            return w, plgpu.load(x_ref.at[m0, pl.ds(c0, bk)], mask=ok, other=0)

        def fma(acc, w, x):
            return acc + i8_to_f32(w) * x.astype(jnp.float32)[None, :]

        zeros = jnp.zeros((bn, bk), jnp.float32)
        if bs.num_stages > 1:
            def body(kk, st):
                acc, w, x = st
                nxt = load(kk + 1)
                return (fma(acc, w, x), *nxt)

            acc = lax.fori_loop(k_lo, k_hi, body, (zeros, *load(k_lo)))[0]
        else:
            acc = lax.fori_loop(k_lo, k_hi, lambda kk, acc: fma(acc, *load(kk)), zeros)
        acc = acc.sum(axis=1)[None, :]
    else:
        def body(kk, acc):
            c0 = kk * bk
            c_ok = (c0 + iota(bk)) < k
            w = plgpu.load(codes_ref.at[pl.ds(r0, bn), pl.ds(c0, bk)], mask=r_ok[:, None] & c_ok[None, :], other=0)
            x = plgpu.load(x_ref.at[pl.ds(m0, bm), pl.ds(c0, bk)], mask=m_ok[:, None] & c_ok[None, :], other=0)
            x = x.astype(cdt)
            if use_dot and bs.swap_ab:  # acc [bn, bm] += W x^T: the decoded weight is the MMA's A operand
                return acc + contract(w, x, use_dot=True, transposed=False)
            return acc + contract(x, w, use_dot=use_dot, transposed=False)

        if use_dot and bs.swap_ab:
            acc = lax.fori_loop(k_lo, k_hi, body, jnp.zeros((bn, bm), jnp.float32)).T
        else:
            acc = lax.fori_loop(k_lo, k_hi, body, jnp.zeros((bm, bn), jnp.float32))
    scale = plgpu.load(scales_ref.at[pl.ds(r0, bn)], mask=r_ok, other=0.0)
    plgpu.store(o_ref.at[s, pl.ds(m0, bm), pl.ds(r0, bn)], (acc * scale[None, :]).astype(o_ref.dtype),
                mask=m_ok[:, None] & r_ok[None, :])


def _int8_matmul_t_kernel(
    dy_ref,  # (M, N) whole; read in (block_m, block_n) blocks
    codes_ref,  # (N, K) int8 whole; read in (block_n, block_k) blocks
    scales_ref,  # (N,) f32; read in (block_n,) blocks
    o_ref,  # (split, M, K); written in (block_m, block_k) blocks
    *, shape, n_steps, block_sizes, cdt,
):
    (m, n, k), bs = shape, block_sizes
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    m0, c0, s = pl.program_id(0) * bm, pl.program_id(1) * bk, pl.program_id(2)
    m_ok = (m0 + iota(bm)) < m
    c_ok = (c0 + iota(bk)) < k

    def body(nn, acc):
        r0 = nn * bn
        r_ok = (r0 + iota(bn)) < n
        w = plgpu.load(codes_ref.at[pl.ds(r0, bn), pl.ds(c0, bk)], mask=r_ok[:, None] & c_ok[None, :], other=0)
        dy = plgpu.load(dy_ref.at[pl.ds(m0, bm), pl.ds(r0, bn)], mask=m_ok[:, None] & r_ok[None, :], other=0)
        scale = plgpu.load(scales_ref.at[pl.ds(r0, bn)], mask=r_ok, other=0.0)
        dys = (dy.astype(jnp.float32) * scale[None, :]).astype(cdt)  # the scale rides on the reduced axis
        return acc + contract(dys, w, use_dot=_config.uses_dot(bs), transposed=True)

    n_lo = s * n_steps
    n_hi = jnp.minimum(n_lo + n_steps, pl.cdiv(n, bn))
    acc = lax.fori_loop(n_lo, n_hi, body, jnp.zeros((bm, bk), jnp.float32))
    plgpu.store(o_ref.at[s, pl.ds(m0, bm), pl.ds(c0, bk)], acc.astype(o_ref.dtype),
                mask=m_ok[:, None] & c_ok[None, :])


@functools.partial(jax.jit, static_argnames=("transposed", "interpret", "block_sizes"))
def _int8_matmul(x, ct: CompressedTensor, *, transposed: bool, interpret: bool, block_sizes: BlockSizes):
    n, k = ct.header.storage_shape
    m = x.shape[0]
    bs = block_sizes
    out_len = k if transposed else n
    if m == 0 or n == 0 or k == 0:
        return jnp.zeros((m, out_len), x.dtype)
    reduced_steps = pl.cdiv(n, bs.block_n) if transposed else pl.cdiv(k, bs.block_k)
    split = reduced_steps if bs.split == 0 else min(bs.split, reduced_steps)
    steps = -(-reduced_steps // split)
    split = -(-reduced_steps // steps)
    out_dtype = x.dtype if split == 1 else jnp.float32
    cdt = _config.compute_dtype(x.dtype, jnp.int8)
    if transposed:
        kernel = functools.partial(_int8_matmul_t_kernel, shape=(m, n, k), n_steps=steps, block_sizes=bs, cdt=cdt)
        grid, name = (pl.cdiv(m, bs.block_m), pl.cdiv(k, bs.block_k), split), "ltjax_int8_matmul_t"
    else:
        kernel = functools.partial(_int8_matmul_kernel, shape=(m, n, k), k_steps=steps, block_sizes=bs, cdt=cdt)
        grid, name = (pl.cdiv(m, bs.block_m), pl.cdiv(n, bs.block_n), split), "ltjax_int8_matmul"
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split, m, out_len), out_dtype),
        grid=grid,
        compiler_params=bs.compiler_params(),
        interpret=interpret,
        name=name,
    )(x, ct.codes, ct.scales)
    return out[0] if split == 1 else out.sum(axis=0).astype(x.dtype)


def mosaic_reason(x, ct: CompressedTensor, bs: BlockSizes, *, interpret: bool) -> str | None:
    """None when `int8_matmul` with block sizes ``bs`` runs the Mosaic GPU kernel, else why it does not."""
    if bs.mosaic is None:
        return "the block sizes carry no MosaicTiles"
    return why_not_mosaic(x, ct, bs.mosaic, interpret=interpret)


def int8_matmul(x, ct: CompressedTensor, *, interpret: bool | None = None, block_sizes: BlockSizes | None = None):
    """``x [M, K] @ S[N, K].T -> [M, N]`` for int8 storage ``S ≈ codes * scales[:, None]``, dequantised in registers."""
    bs = block_sizes or _config.get_block_sizes("int8_matmul", x.shape[0], x.dtype)
    interpret = _config.resolve_interpret(interpret)
    if bs.mosaic is not None:
        why = mosaic_reason(x, ct, bs, interpret=interpret)
        if why is None:
            return mosaic_matmul(x, ct.codes, ct.scales, tiles=bs.mosaic)
        log_once(f"mosaic:{why}", "ltjax: int8 matmul on Triton, not Mosaic GPU: %s", why)
        bs = dataclasses.replace(bs, mosaic=None)
    return _int8_matmul(x, ct, transposed=False, interpret=interpret,
                        block_sizes=_config.fit_block_m(bs, x.shape[0]))


def int8_matmul_t(dy, ct: CompressedTensor, *, interpret: bool | None = None, block_sizes: BlockSizes | None = None):
    """``dy [M, N] @ S[N, K] -> [M, K]`` for int8 storage ``S``, dequantised in registers."""
    bs = _config.triton_only(block_sizes or _config.get_block_sizes("int8_matmul_t", dy.shape[0], dy.dtype),
                             "int8_matmul_t")
    return _int8_matmul(dy, ct, transposed=True, interpret=_config.resolve_interpret(interpret),
                        block_sizes=_config.fit_block_m(bs, dy.shape[0]))


def int8_matmul_reference(x, ct: CompressedTensor, *, transposed: bool = False):
    """Pure jnp: dequantise the storage matrix in f32, one f32 matmul, cast to ``x.dtype``."""
    s = decode_storage(ct, jnp.float32)
    return (x.astype(jnp.float32) @ (s if transposed else s.T)).astype(x.dtype)
