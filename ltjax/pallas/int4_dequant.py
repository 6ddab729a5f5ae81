"""int4 dequantisation to a dense storage matrix (or its transpose): ``(q - 8) * s`` or ``q * s + m`` per
element, in f32, one (block_n, block_k) block per program, a group at a time."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ltjax._format import CompressedTensor, decode_storage
from ltjax.pallas import _config
from ltjax.pallas._config import BlockSizes
from ltjax.pallas._decode import iota


def _int4_dequant_kernel(
    codes_ref,  # (N, K/2) uint8 whole; read in (block_n, G/2) blocks, one group each
    scales_ref,  # (N, K/G) f16; read in (block_n,) columns
    *refs,  # asymmetric: mins_ref (N, K/G) f16, in (block_n,) columns; then o_ref: (N, K), or (K, N)
    # when ``transposed``, written in (block_n, G) blocks
    shape, group, block_sizes, transposed, asymmetric,
):
    (n, k), bs = shape, block_sizes
    mins_ref, o_ref = refs if asymmetric else (None, *refs)
    bn, hg, ng = bs.block_n, group // 2, bs.block_k // group
    r0, g0 = pl.program_id(0) * bn, pl.program_id(1) * ng
    r_ok = (r0 + iota(bn)) < n
    for g in range(ng):
        gi = g0 + g
        g_ok = gi < k // group
        codes = plgpu.load(codes_ref.at[pl.ds(r0, bn), pl.ds(gi * hg, hg)],
                           mask=jnp.broadcast_to(r_ok[:, None] & g_ok, (bn, hg)), other=0)
        sc = plgpu.load(scales_ref.at[pl.ds(r0, bn), gi], mask=r_ok & g_ok, other=0.0).astype(jnp.float32)
        c = codes.astype(jnp.int32)
        # Column 2j is byte j's low nibble: (lo, hi) pairs, joined on a last axis of 2, are the
        # group's G columns in order. Each product q * s is exact in f32 (4 by 11 significant bits).
        q = jnp.stack([c & 15, c >> 4], axis=-1).reshape(bn, group).astype(jnp.float32)
        if asymmetric:
            mn = plgpu.load(mins_ref.at[pl.ds(r0, bn), gi], mask=r_ok & g_ok, other=0.0).astype(jnp.float32)
            vals = q * sc[:, None] + mn[:, None]
        else:
            vals = (q - 8.0) * sc[:, None]
        vals = vals.astype(o_ref.dtype)
        ok = jnp.broadcast_to(r_ok[:, None] & g_ok, (bn, group))
        if transposed:
            plgpu.store(o_ref.at[pl.ds(gi * group, group), pl.ds(r0, bn)], vals.T, mask=ok.T)
        else:
            plgpu.store(o_ref.at[pl.ds(r0, bn), pl.ds(gi * group, group)], vals, mask=ok)


@functools.partial(jax.jit, static_argnames=("interpret", "block_sizes", "dtype", "transposed"))
def _int4_dequant(ct: CompressedTensor, *, interpret: bool, block_sizes: BlockSizes, dtype, transposed: bool):
    h = ct.header
    n, k = h.storage_shape
    out = (k, n) if transposed else (n, k)
    if n == 0 or k == 0:
        return jnp.zeros(out, dtype)
    bs = block_sizes
    args = (ct.codes, ct.scales) + ((ct.mins,) if h.asymmetric else ())
    return pl.pallas_call(
        functools.partial(_int4_dequant_kernel, shape=(n, k), group=h.group, block_sizes=bs, transposed=transposed,
                          asymmetric=h.asymmetric),
        out_shape=jax.ShapeDtypeStruct(out, dtype),
        grid=(pl.cdiv(n, bs.block_n), pl.cdiv(k, bs.block_k)),
        compiler_params=bs.compiler_params(),
        interpret=interpret,
        name="ltjax_int4_dequant",
    )(*args)


def int4_dequant(ct: CompressedTensor, *, dtype=None, interpret: bool | None = None,
                 block_sizes: BlockSizes | None = None, transposed: bool = False):
    """The dense [N, K] storage matrix of an int4 tensor (``dtype`` default: its own), decoded in f32 by
    the format's rule and then rounded, as `ltjax.decompress_reference` does.

    ``transposed``: its [K, N] transpose, written by the kernel (for a 2-D ``axis=1`` weight,
    the logical tensor itself, with no transpose pass over the dense output).
    """
    kernel = "int4_dequant_t" if transposed else "int4_dequant"
    bs = _config.triton_only(block_sizes or _config.get_block_sizes(kernel, 1), kernel)
    return _int4_dequant(ct, interpret=_config.resolve_interpret(interpret),
                         block_sizes=_config.fit_group(bs, ct.header.group, explicit=block_sizes is not None),
                         dtype=jnp.dtype(ct.dtype if dtype is None else dtype), transposed=transposed)


def int4_dequant_reference(ct: CompressedTensor, *, dtype=None):
    """Pure jnp: the format's reference decoder of the storage matrix."""
    return decode_storage(ct, dtype)
