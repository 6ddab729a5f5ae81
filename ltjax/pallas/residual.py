"""Pallas (Triton) kernels that pack and unpack compressed activation residuals."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_WORD_BITS = 32


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tiling of the flat tensor: each program handles ``block_words * 32`` elements."""

    block_words: int = 128  # power of two (Triton)
    num_warps: int = 4
    num_stages: int = 1


DEFAULT_BLOCK_SIZES = BlockSizes()


def _compiler_params(bs: BlockSizes):
    return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _geometry(n: int, bs: BlockSizes):
    words = -(-n // _WORD_BITS)
    blocks = max(1, -(-words // bs.block_words))
    return words, blocks, blocks * bs.block_words


def _bit_iota(shape):
    return lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)


# --------------------------------------------------------------------------------------
# pack_mask: bool[n] -> uint32[ceil(n / 32)]
# --------------------------------------------------------------------------------------


def _pack_mask_kernel(m_ref, w_ref):
    bits = m_ref[...].astype(jnp.uint32)  # (block_words, 32)
    w_ref[...] = jnp.sum(bits << _bit_iota(bits.shape), axis=1)  # (block_words,)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def pack_mask(mask, *, block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES, interpret=False):
    """Packs a bool mask (flattened) into uint32 words; as ``pack_mask_reference``."""
    n = mask.size
    words, blocks, padded = _geometry(n, block_sizes)
    m = jnp.pad(jnp.ravel(mask).astype(jnp.int8), (0, padded * _WORD_BITS - n))
    bw = block_sizes.block_words
    out = pl.pallas_call(
        _pack_mask_kernel,
        out_shape=jax.ShapeDtypeStruct((padded,), jnp.uint32),
        grid=(blocks,),
        in_specs=[pl.BlockSpec((bw, _WORD_BITS), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((bw,), lambda i: (i,)),
        compiler_params=_compiler_params(block_sizes),
        interpret=interpret,
        name="ltjax_pack_mask",
    )(m.reshape(padded, _WORD_BITS))
    return out[:words]


# --------------------------------------------------------------------------------------
# unpack_mask: uint32 words -> bool[n]
# --------------------------------------------------------------------------------------


def _unpack_mask_kernel(w_ref, m_ref):
    words = w_ref[...]  # (block_words,)
    bits = (words[:, None] >> _bit_iota((words.shape[0], _WORD_BITS))) & jnp.uint32(1)
    m_ref[...] = bits.astype(jnp.int8)  # (block_words, 32)


@functools.partial(jax.jit, static_argnames=("n", "block_sizes", "interpret"))
def unpack_mask(words, n: int, *, block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES,
                interpret=False):
    """The first ``n`` bits of ``words`` as a flat bool array."""
    nw, blocks, padded = _geometry(n, block_sizes)
    bw = block_sizes.block_words
    w = jnp.pad(words, (0, padded - words.shape[0]))
    out = pl.pallas_call(
        _unpack_mask_kernel,
        out_shape=jax.ShapeDtypeStruct((padded, _WORD_BITS), jnp.int8),
        grid=(blocks,),
        in_specs=[pl.BlockSpec((bw,), lambda i: (i,))],
        out_specs=pl.BlockSpec((bw, _WORD_BITS), lambda i: (i, 0)),
        compiler_params=_compiler_params(block_sizes),
        interpret=interpret,
        name="ltjax_unpack_mask",
    )(w)
    return out.reshape(-1)[:n].astype(jnp.bool_)


# --------------------------------------------------------------------------------------
# Shared: global position of every set bit (no global scan inside a kernel)
# --------------------------------------------------------------------------------------


def _block_offsets(words_padded, bw: int):
    """Exclusive prefix sum of set bits per block of ``bw`` words (tiny, in XLA)."""
    counts = jnp.sum(lax.population_count(words_padded).reshape(-1, bw).astype(jnp.int32),
                     axis=1)
    return jnp.cumsum(counts) - counts, jnp.sum(counts)


def _popcount(v):
    """Bit count of uint32 words by SWAR shifts (upstream Triton rejects math.ctpop)."""
    v = v - ((v >> 1) & jnp.uint32(0x55555555))
    v = (v & jnp.uint32(0x33333333)) + ((v >> 2) & jnp.uint32(0x33333333))
    v = (v + (v >> 4)) & jnp.uint32(0x0F0F0F0F)
    return ((v * jnp.uint32(0x01010101)) >> 24).astype(jnp.int32)


def _positions(words, block_offset):
    """Global packed index of each bit of a (block_words,) word block: (block_words, 32)."""
    pop = _popcount(words)
    word_excl = jnp.cumsum(pop) - pop  # (block_words,)
    iota = _bit_iota((words.shape[0], _WORD_BITS))
    below = words[:, None] & ((jnp.uint32(1) << iota) - jnp.uint32(1))
    rank = _popcount(below)
    bits = ((words[:, None] >> iota) & jnp.uint32(1)) == 1
    return block_offset + word_excl[:, None] + rank, bits


# --------------------------------------------------------------------------------------
# pack_sparse: x -> (mask words, first `capacity` nonzeros, nnz)
# --------------------------------------------------------------------------------------


def _scatter_values_kernel(x_ref, w_ref, off_ref, zeros_ref, v_ref, *, capacity: int):
    del zeros_ref  # aliased to v_ref: the zero fill of unused slots
    x = x_ref[...]  # (block_words, 32)
    words = w_ref[...]  # (block_words,)
    pos, bits = _positions(words, off_ref[pl.program_id(0)])
    keep = bits & (pos < capacity)
    # Masked lanes point at the spare slot `capacity` (sliced off), never at a real one:
    # an interpreted masked store rewrites its target, which must not race a real write.
    plgpu.store(v_ref.at[jnp.where(keep, pos, capacity)], x, mask=keep)


@functools.partial(jax.jit, static_argnames=("capacity", "block_sizes", "interpret"))
def pack_sparse(x, capacity: int, *, block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES,
                interpret=False):
    """As ``pack_sparse_reference``: (words uint32, values[capacity], nnz int32)."""
    n = x.size
    nw, blocks, padded = _geometry(n, block_sizes)
    bw = block_sizes.block_words
    flat = jnp.ravel(x)
    uint = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    nonzero = lax.bitcast_convert_type(flat, uint) != 0
    words = pack_mask(nonzero, block_sizes=block_sizes, interpret=interpret)
    words_padded = jnp.pad(words, (0, padded - nw))
    offsets, nnz = _block_offsets(words_padded, bw)
    xp = jnp.pad(flat, (0, padded * _WORD_BITS - n)).reshape(padded, _WORD_BITS)
    values = pl.pallas_call(
        functools.partial(_scatter_values_kernel, capacity=capacity),
        out_shape=jax.ShapeDtypeStruct((capacity + 1,), x.dtype),
        grid=(blocks,),
        in_specs=[pl.BlockSpec((bw, _WORD_BITS), lambda i: (i, 0)),
                  pl.BlockSpec((bw,), lambda i: (i,)),
                  pl.no_block_spec,
                  pl.no_block_spec],
        out_specs=pl.no_block_spec,
        input_output_aliases={3: 0},
        compiler_params=_compiler_params(block_sizes),
        interpret=interpret,
        name="ltjax_pack_sparse",
    )(xp, words_padded, offsets, jnp.zeros((capacity + 1,), x.dtype))
    return words, values[:capacity], nnz


# --------------------------------------------------------------------------------------
# unpack_sparse: (mask words, packed values) -> dense x
# --------------------------------------------------------------------------------------


def _unpack_sparse_kernel(w_ref, off_ref, v_ref, o_ref, *, capacity: int):
    words = w_ref[...]  # (block_words,)
    pos, bits = _positions(words, off_ref[pl.program_id(0)])
    keep = bits & (pos < capacity)
    vals = plgpu.load(v_ref.at[jnp.where(keep, pos, 0)], mask=keep, other=0)
    o_ref[...] = vals  # (block_words, 32)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "block_sizes", "interpret"))
def unpack_sparse(words, values, shape, dtype, *, block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES,
                  interpret=False):
    """Dense array of ``shape`` from mask words and packed nonzeros (zeros elsewhere)."""
    n = math.prod(shape)
    nw, blocks, padded = _geometry(n, block_sizes)
    bw = block_sizes.block_words
    words_padded = jnp.pad(words, (0, padded - words.shape[0]))
    offsets, _ = _block_offsets(words_padded, bw)
    capacity = values.shape[0]
    out = pl.pallas_call(
        functools.partial(_unpack_sparse_kernel, capacity=capacity),
        out_shape=jax.ShapeDtypeStruct((padded, _WORD_BITS), dtype),
        grid=(blocks,),
        in_specs=[pl.BlockSpec((bw,), lambda i: (i,)),
                  pl.no_block_spec,
                  pl.no_block_spec],
        out_specs=pl.BlockSpec((bw, _WORD_BITS), lambda i: (i, 0)),
        compiler_params=_compiler_params(block_sizes),
        interpret=interpret,
        name="ltjax_unpack_sparse",
    )(words_padded, offsets, values.astype(dtype))
    return out.reshape(-1)[:n].reshape(shape)


# --------------------------------------------------------------------------------------
# Dispatch predicate
# --------------------------------------------------------------------------------------


def can_use_pallas_pack(n: int, dtype=jnp.float32, platform: str | None = None) -> bool:
    """Whether the Pallas kernels serve a tensor of ``n`` elements of ``dtype`` on ``platform`` (default: here)."""
    return pallas_pack_unsupported_reason(n, dtype, platform) is None


def pallas_pack_unsupported_reason(n: int, dtype=jnp.float32, platform: str | None = None) -> str | None:
    """None when the Pallas path applies on ``platform`` (default: this host's backend), else why not."""
    platform = platform or jax.default_backend()
    if platform not in ("gpu", "cuda", "rocm"):
        return f"{platform=} is not a GPU"
    if jnp.dtype(dtype).itemsize not in (2, 4):
        return f"{dtype=} is not a 16- or 32-bit float"
    if n >= 2**31:
        return f"{n=} does not fit int32 positions"
    return None
