"""Layer math on `CompressedTensor` kernels shared by `ltjax.nn` (linen) and `ltjax.nnx`.

Everything here computes through the public op layer (`ltjax.matmul`, `ltjax.decompress`)
so the fused paths apply as they land. Two helpers read the documented storage layout
directly: `kernel_view` (a header-only reshape) and `take_rows` (an embedding gather that
decodes only the gathered rows of the ``raw`` and ``int8`` codecs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ltjax._config import log_once
from ltjax._format import CompressedTensor, int4_dequantize
from ltjax._layout import Contraction, Layout
from ltjax.ops.decompress import decompress
from ltjax.ops.matmul import matmul


def note_once(key: str, message: str) -> None:
    """A slower path, said once per process and key at WARNING (fallbacks are never silent)."""
    log_once(key, "%s", message, level=logging.WARNING)


def is_compressed(x: Any) -> bool:
    return isinstance(x, CompressedTensor)


def batch_shape(ct: CompressedTensor) -> tuple[int, ...]:
    """Leading axes the arrays carry beyond the header (a stack of layers, e.g. for nn.scan)."""
    return ct.stack_shape


def check_unbatched(ct: CompressedTensor, where: str) -> None:
    b = batch_shape(ct)
    if b:
        raise ValueError(
            f"{where}: compressed kernel of shape={ct.shape} carries stacked layer axes {b}; a stacked "
            "tensor is only usable inside nn.scan / nnx.scan, which slice it one layer at a time"
        )


@contextlib.contextmanager
def matmul_precision(precision: Any):
    """Applies a flax ``precision`` (None, a `lax.Precision`, a string or a pair) to the ops inside."""
    if precision is None:
        yield
        return
    if isinstance(precision, (tuple, list)):
        precision = max(lax.Precision(p) if not isinstance(p, str) else lax.Precision[p.upper()] for p in precision)
    name = precision.name.lower() if isinstance(precision, lax.Precision) else str(precision)
    with jax.default_matmul_precision(name):
        yield


def kernel_view(ct: CompressedTensor, shape: tuple[int, int]) -> CompressedTensor | None:
    """``ct`` seen as the 2-D ``[K, N]`` matmul kernel ``shape``, without touching the arrays.

    Valid when the channel axis is the last logical axis and spans all of ``N``: then the
    storage matrix ``[N, K]`` is the same for both shapes (the non-channel axes flatten in
    order). Returns ``None`` where no header-only view exists.
    """
    h = ct.header
    if tuple(h.shape) == tuple(shape) and h.axis == len(shape) - 1:
        return ct
    if h.axis is None or h.axis != len(h.shape) - 1 or h.shape[-1] != shape[1]:
        return None
    if math.prod(h.shape) != shape[0] * shape[1]:
        return None
    return dataclasses.replace(ct, header=dataclasses.replace(h, shape=tuple(shape), axis=1))


def linear(x: jax.Array, ct: CompressedTensor, bias: jax.Array | None, *, dtype, precision) -> jax.Array:
    """``x[..., K] @ W[K, N] + bias`` in ``dtype`` (inputs already promoted by the caller)."""
    with matmul_precision(precision):
        y = matmul(x, ct)
    y = y.astype(dtype)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


# ---------------------------------------------------------------------- contractions as one matmul
def matmul_view(ct: CompressedTensor, layout: Layout, kernel_shape: Sequence[int]) -> CompressedTensor | None:
    """``ct`` as the 2-D ``[K, N]`` kernel of ``layout``, without touching its arrays (None: no such view).

    ``ct`` is either stored in that layout already (2-D ``[K, N]``, what `Layout.to_matmul`
    makes) or holds the N-D kernel with an identity ``perm`` (`kernel_view`).
    """
    k, n = layout.matmul_shape(kernel_shape)
    identity = layout.perm == tuple(range(len(kernel_shape)))
    if tuple(ct.shape) == tuple(kernel_shape):
        return kernel_view(ct, (k, n)) if identity else None  # a transposed square 2-D kernel: as it is
    if ct.ndim == 2 and tuple(ct.shape) == (k, n) and ct.header.axis == 1:
        return ct
    return None


def dense_kernel(ct: CompressedTensor, layout: Layout | None, kernel_shape: Sequence[int]) -> jax.Array:
    """The dense N-D kernel of ``ct``: decompressed, and un-flattened if it is stored as ``[K, N]``."""
    w = decompress(ct)
    if tuple(ct.shape) == tuple(kernel_shape):
        return w
    return layout.from_matmul(w, kernel_shape)


def contract(
    x: jax.Array, ct2: CompressedTensor, c: Contraction, kernel_shape: Sequence[int], *, dtype, precision
) -> jax.Array:
    """``x`` contracted with the kernel held in ``ct2`` (its `matmul_view`): one `ltjax.matmul`."""
    if c.x_summed:
        x = jnp.sum(x, axis=c.x_summed, keepdims=True)
    free_dims = tuple(x.shape[a] for a in c.x_free)
    x2 = jnp.transpose(x, c.x_free + c.x_contract + c.x_summed).reshape(free_dims + (ct2.shape[0],))
    with matmul_precision(precision):
        y = matmul(x2, ct2)
    feat_dims = tuple(kernel_shape[p] for p in c.layout.perm[c.layout.n_in :])
    y = y.astype(dtype).reshape(free_dims + feat_dims)
    return y if c.out_perm is None else jnp.transpose(y, c.out_perm)


def general(
    x: jax.Array,
    ct: CompressedTensor,
    c: Contraction | None,
    kernel_shape: Sequence[int],
    dense_op,
    *,
    dtype,
    precision,
    where: str,
    why: str = "",
    layout: Layout | None = None,
) -> jax.Array:
    """A DenseGeneral / Einsum contraction on a compressed kernel (no bias).

    One `ltjax.matmul` when ``ct`` has a `matmul_view` for ``c``; otherwise (batch axes, an
    einsum that is no matmul, a kernel stored in another layout) ``dense_op(x, kernel)`` on
    the decompressed kernel, logged once with the reason and the fix. ``layout``: how ``ct``
    is stored, where the caller knows it (default: ``c``'s).
    """
    layout = layout or (None if c is None else c.layout)
    k_n = None if layout is None else layout.matmul_shape(kernel_shape)
    if tuple(ct.shape) not in (tuple(kernel_shape), k_n):
        raise ValueError(
            f"{where}: compressed kernel shape={ct.shape} does not match the module: expected {tuple(kernel_shape)}"
            + ("" if k_n is None else f" (or {k_n}, its [K, N] matmul layout)") + f" for inputs of shape={x.shape}"
        )
    view = None if c is None else matmul_view(ct, c.layout, kernel_shape)
    if view is not None:
        return contract(x, view, c, kernel_shape, dtype=dtype, precision=precision)
    if c is not None:
        why = (
            f"kernel shape={ct.shape} axis={ct.header.axis} is not stored in the layout this contraction "
            f"needs ({c.layout.matmul_shape(kernel_shape)} after transposing the kernel by {c.layout.perm}); "
            "compress with ltjax.nn.compress_params(params, policy, model=model, args=...) (linen) or "
            "ltjax.nnx.compress_model (nnx), which store each kernel in the layout its module contracts"
        )
    note_once(f"general:{where}:{ct.shape}", f"ltjax: {where}: decompressing the kernel before the contraction "
              f"(slower, a dense temp): {why}")
    w = dense_kernel(ct, layout, kernel_shape).astype(dtype)
    with matmul_precision(precision):
        return dense_op(x.astype(dtype), w)


def take_rows(ct: CompressedTensor, idx: jax.Array, dtype) -> jax.Array:
    """``jnp.take(E, idx, axis=0)`` for an embedding ``E [V, D]`` held in ``ct``.

    ``raw``, ``int8`` and ``int4`` decode only the gathered rows (``codes[idx] * scales[idx]`` when
    the rows are the channels, the gathered storage columns otherwise). The bitmask codecs
    decompress the table first (logged once).
    """
    h = ct.header
    if ct.codec == "int4" and h.axis in (0, 1):
        return _int4_rows(ct, idx).astype(ct.dtype).astype(dtype)
    if ct.codec in ("raw", "int8") and h.axis in (0, 1):
        stored = ct.values if ct.codec == "raw" else ct.codes
        if h.axis == 0:  # storage [V, D]: rows are channels
            rows = jnp.take(stored, idx, axis=0)
            if ct.codec == "int8":
                rows = rows.astype(jnp.float32) * jnp.take(ct.scales, idx, axis=0)[..., None]
        else:  # storage [D, V]: gather columns
            rows = jnp.moveaxis(jnp.take(stored, idx, axis=1), 0, -1)
            if ct.codec == "int8":
                rows = rows.astype(jnp.float32) * ct.scales
        return rows.astype(ct.dtype).astype(dtype)
    note_once(
        f"take:{ct.codec}:{h.axis}",
        f"ltjax: embedding lookup on a {ct.codec!r} table (axis={h.axis}) decompresses the whole table",
    )
    return jnp.take(decompress(ct).astype(dtype), idx, axis=0)


def _int4_rows(ct: CompressedTensor, idx: jax.Array) -> jax.Array:
    """f32 rows ``idx`` of an int4 embedding ``[V, D]``: only the gathered codes and groups are decoded."""
    h = ct.header
    mins = ct.mins
    if h.axis == 0:  # storage [V, D]: a row is a channel, its groups run along D
        take = lambda a: jnp.take(a, idx, axis=0)  # noqa: E731
        return int4_dequantize(h, take(ct.codes), take(ct.scales), None if mins is None else take(mins))
    # storage [D, V]: column v is nibble v % 2 of byte v // 2 in every row; its group is v // G
    byte = jnp.take(ct.codes, idx // 2, axis=1).astype(jnp.int32)  # [D, *idx]
    q = jnp.where(idx % 2 == 1, byte >> 4, byte & 15).astype(jnp.float32)
    s = jnp.take(ct.scales, idx // h.group, axis=1).astype(jnp.float32)
    x = q * s + jnp.take(mins, idx // h.group, axis=1).astype(jnp.float32) if h.asymmetric else (q - 8.0) * s
    return jnp.moveaxis(x, 0, -1)


def attend(query: jax.Array, ct: CompressedTensor, *, dtype) -> jax.Array:
    """``query @ E.T`` for an embedding ``E [V, D]``: a matmul on the free transpose."""
    return matmul(query, ct.T).astype(dtype)


def accumulation(x: jax.Array, dtype, preferred_element_type) -> tuple[jax.Array, Any]:
    """flax's ``preferred_element_type``: ``x`` widened to it where it is wider, and the result dtype."""
    if preferred_element_type is None:
        return x, dtype
    return x.astype(jnp.promote_types(x.dtype, preferred_element_type)), preferred_element_type


def out_sharded(y: jax.Array, out_sharding: Any) -> jax.Array:
    """flax nnx's ``out_sharding`` (explicit-sharding mode): the result resharded as ``lax.dot_general`` would."""
    return y if out_sharding is None else jax.sharding.reshard(y, out_sharding)
