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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ltjax._format import CompressedTensor
from ltjax._ops import decompress, matmul

log = logging.getLogger("ltjax")
_NOTED: set[str] = set()


def note_once(key: str, message: str) -> None:
    """Logs a slower-path note once per process and key (style: fallbacks are never silent)."""
    if key not in _NOTED:
        _NOTED.add(key)
        log.warning(message)


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


def general_dot(
    x: jax.Array,
    ct: CompressedTensor,
    *,
    axis: Sequence[int],
    batch_dims: Sequence[int],
    features: tuple[int, ...],
    dtype,
    precision,
    where: str,
) -> jax.Array:
    """The flax DenseGeneral contraction of ``x`` with a compressed kernel (no bias).

    ``ct`` may hold the kernel in its N-D shape ``batch + in + features`` or flattened to
    ``[prod(in), prod(features)]``. The contraction is a plain `ltjax.matmul` after moving
    the contracted axes of ``x`` last and flattening them; where the kernel has batch axes
    or its storage is not the matmul layout (`kernel_view`), the kernel is decompressed
    first (logged once): compress such kernels with `ltjax.nn.compress_params`, which
    stores them flattened.
    """
    axis = tuple(a % x.ndim for a in axis)
    batch_dims = tuple(a % x.ndim for a in batch_dims)
    in_shape = tuple(x.shape[a] for a in axis)
    nd_shape = tuple(x.shape[a] for a in batch_dims) + in_shape + tuple(features)
    k, n = math.prod(in_shape), math.prod(features)
    if tuple(ct.shape) not in (nd_shape, (k, n)):
        raise ValueError(
            f"{where}: compressed kernel shape={ct.shape} does not match the module: expected {nd_shape} "
            f"(or flattened {(k, n)}) for inputs of shape={x.shape}, {axis=}, features={tuple(features)}"
        )
    view = None if batch_dims else kernel_view(ct, (k, n))
    if view is None:
        note_once(
            f"general:{ct.shape}:{ct.header.axis}",
            f"ltjax: {where}: kernel shape={ct.shape} axis={ct.header.axis} is not stored as a [K, N] matmul "
            "kernel; decompressing it before the contraction (slower, dense temp). "
            "Store it flattened: ltjax.nn.compress_params(..., flatten={pattern: n_in}).",
        )
        w = decompress(ct).astype(dtype).reshape(nd_shape)
        nb = len(batch_dims)
        with matmul_precision(precision):
            return lax.dot_general(
                x.astype(dtype), w, ((axis, tuple(range(nb, nb + len(axis)))), (batch_dims, tuple(range(nb))))
            )
    rest = [a for a in range(x.ndim) if a not in axis]
    x2 = jnp.transpose(x, rest + list(axis)).reshape(tuple(x.shape[a] for a in rest) + (k,))
    with matmul_precision(precision):
        y = matmul(x2, view)
    return y.astype(dtype).reshape(tuple(x.shape[a] for a in rest) + tuple(features))


def take_rows(ct: CompressedTensor, idx: jax.Array, dtype) -> jax.Array:
    """``jnp.take(E, idx, axis=0)`` for an embedding ``E [V, D]`` held in ``ct``.

    ``raw`` and ``int8`` decode only the gathered rows (``codes[idx] * scales[idx]`` when the
    rows are the channels, the gathered storage columns otherwise). The bitmask codecs
    decompress the table first (logged once).
    """
    h = ct.header
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


def attend(query: jax.Array, ct: CompressedTensor, *, dtype) -> jax.Array:
    """``query @ E.T`` for an embedding ``E [V, D]``: a matmul on the free transpose."""
    return matmul(query, ct.T).astype(dtype)
