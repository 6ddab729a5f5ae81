"""int8 dequantisation to a dense storage matrix: ``codes * scales[:, None]``, one (block_n, block_k)
block per program."""

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


def _int8_dequant_kernel(
    codes_ref,  # (N, K) int8 whole; read in (block_n, block_k) blocks
    scales_ref,  # (N,) f32; read in (block_n,) blocks
    o_ref,  # (N, K), or (K, N) when ``transposed``; written in (block_n, block_k) blocks
    *, shape, block_sizes, transposed,
):
    (n, k), bs = shape, block_sizes
    bn, bk = bs.block_n, bs.block_k
    r0, c0 = pl.program_id(0) * bn, pl.program_id(1) * bk
    r_ok = (r0 + iota(bn)) < n
    ok = r_ok[:, None] & ((c0 + iota(bk)) < k)[None, :]
    codes = plgpu.load(codes_ref.at[pl.ds(r0, bn), pl.ds(c0, bk)], mask=ok, other=0)
    scale = plgpu.load(scales_ref.at[pl.ds(r0, bn)], mask=r_ok, other=0.0)
    vals = (codes.astype(jnp.float32) * scale[:, None]).astype(o_ref.dtype)
    if transposed:
        plgpu.store(o_ref.at[pl.ds(c0, bk), pl.ds(r0, bn)], vals.T, mask=ok.T)
    else:
        plgpu.store(o_ref.at[pl.ds(r0, bn), pl.ds(c0, bk)], vals, mask=ok)


@functools.partial(jax.jit, static_argnames=("interpret", "block_sizes", "dtype", "transposed"))
def _int8_dequant(ct: CompressedTensor, *, interpret: bool, block_sizes: BlockSizes, dtype, transposed: bool):
    n, k = ct.header.storage_shape
    out = (k, n) if transposed else (n, k)
    if n == 0 or k == 0:
        return jnp.zeros(out, dtype)
    bs = block_sizes
    return pl.pallas_call(
        functools.partial(_int8_dequant_kernel, shape=(n, k), block_sizes=bs, transposed=transposed),
        out_shape=jax.ShapeDtypeStruct(out, dtype),
        grid=(pl.cdiv(n, bs.block_n), pl.cdiv(k, bs.block_k)),
        compiler_params=bs.compiler_params(),
        interpret=interpret,
        name="ltjax_int8_dequant",
    )(ct.codes, ct.scales)


def int8_dequant(ct: CompressedTensor, *, dtype=None, interpret: bool | None = None,
                 block_sizes: BlockSizes | None = None, transposed: bool = False):
    """The dense [N, K] storage matrix of an int8 tensor (``dtype`` default: its own).

    ``transposed``: its [K, N] transpose, written by the kernel (for a 2-D ``axis=1`` weight,
    the logical tensor itself, with no transpose pass over the dense output).
    """
    kernel = "int8_dequant_t" if transposed else "int8_dequant"
    return _int8_dequant(ct, interpret=_config.resolve_interpret(interpret),
                         block_sizes=_config.triton_only(block_sizes or _config.get_block_sizes(kernel, 1), kernel),
                         dtype=jnp.dtype(ct.dtype if dtype is None else dtype), transposed=transposed)


def int8_dequant_reference(ct: CompressedTensor, *, dtype=None):
    """Pure jnp: the format's reference decoder of the storage matrix."""
    return decode_storage(ct, dtype)
