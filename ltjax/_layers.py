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
import string
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
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


# ---------------------------------------------------------------------- contractions as one matmul
@dataclasses.dataclass(frozen=True)
class Layout:
    """How an N-D kernel is stored as the 2-D matmul kernel ``W2 [K, N]``.

    ``W2 = kernel.transpose(perm).reshape(K, N)``: the first ``n_in`` axes of ``perm`` are
    the contracted ones (K), the rest the output features (N). ``DenseGeneral`` kernels
    ``[*in, *features]`` have ``perm`` the identity and ``n_in = len(in)``.
    """

    perm: tuple[int, ...]
    n_in: int

    def matmul_shape(self, kernel_shape: Sequence[int]) -> tuple[int, int]:
        dims = [kernel_shape[p] for p in self.perm]
        return math.prod(dims[: self.n_in]), math.prod(dims[self.n_in :])

    def to_matmul(self, a: np.ndarray) -> np.ndarray:
        """The host-side kernel ``a`` (``[*lead, *kernel]``, e.g. a stack of layers) as ``[*lead, K, N]``."""
        lead = a.ndim - len(self.perm)
        k, n = self.matmul_shape(a.shape[lead:])
        return np.transpose(a, tuple(range(lead)) + tuple(lead + p for p in self.perm)).reshape(a.shape[:lead] + (k, n))

    def from_matmul(self, w2: jax.Array, kernel_shape: Sequence[int]) -> jax.Array:
        """Inverse of `to_matmul` for one kernel: ``[K, N]`` back to ``kernel_shape``."""
        w = w2.reshape(tuple(kernel_shape[p] for p in self.perm))
        return jnp.transpose(w, tuple(int(i) for i in np.argsort(self.perm)))


@dataclasses.dataclass(frozen=True)
class Contraction:
    """A DenseGeneral or Einsum contraction of ``x`` with a kernel, run as ``x2 [M, K] @ W2 [K, N]``.

    ``x`` loses its ``x_summed`` axes (summed first), is transposed to ``x_free + x_contract``
    and flattened; ``x_contract[i]`` pairs with the kernel's contracted axis ``layout.perm[i]``.
    The product ``[*x_free dims, *kernel feature dims]`` is transposed by ``out_perm``.
    """

    layout: Layout
    x_contract: tuple[int, ...]
    x_free: tuple[int, ...]
    x_summed: tuple[int, ...] = ()
    out_perm: tuple[int, ...] | None = None


def dense_general_contraction(x_ndim: int, n_kernel: int, axis: Sequence[int], batch_dims: Sequence[int]) -> Contraction | None:
    """``flax`` DenseGeneral / LinearGeneral: ``x``'s ``axis`` against the kernel's leading axes (None with batch dims)."""
    if batch_dims:
        return None
    axis = tuple(a % x_ndim for a in axis)
    return Contraction(Layout(tuple(range(n_kernel)), len(axis)), axis, tuple(a for a in range(x_ndim) if a not in axis))


def einsum_contraction(einsum_str: str, x_ndim: int, kernel_ndim: int) -> tuple[Contraction | None, str]:
    """``einsum(einsum_str, x, kernel)`` as a `Contraction`, or ``(None, why not)``.

    A plain matmul needs every kernel letter to be either contracted with ``x`` (in ``x``,
    not in the output) or a feature (in the output, not in ``x``): no batch letters shared by
    all three terms, no repeated letters, no ellipsis on the kernel, at least one of each kind.
    """
    s = einsum_str.replace(" ", "")
    if s.count("->") != 1 or s.split("->")[0].count(",") != 1:
        return None, f"einsum_str={einsum_str!r} is not an explicit two-operand equation 'x,kernel->out'"
    (lhs, rhs), out = s.split("->")[0].split(","), s.split("->")[1]
    if "..." in rhs:
        return None, "an ellipsis in the kernel's term"
    if "..." in lhs:
        n = x_ndim - (len(lhs) - 3)
        fresh = "".join(c for c in string.ascii_letters if c not in s)[: max(n, 0)]
        lhs, out = lhs.replace("...", fresh), out.replace("...", fresh)
    if len(lhs) != x_ndim or len(rhs) != kernel_ndim:
        return None, f"einsum_str={einsum_str!r} does not match x.ndim={x_ndim} and kernel.ndim={kernel_ndim}"
    if any(len(set(t)) != len(t) for t in (lhs, rhs, out)):
        return None, "a repeated letter in one term (a diagonal)"
    batch = [c for c in rhs if c in lhs and c in out]
    if batch:
        return None, f"kernel letters {batch} are batch axes (in x, the kernel and the output)"
    alone = [c for c in rhs if c not in lhs and c not in out]
    if alone:
        return None, f"kernel letters {alone} are summed over the kernel alone"
    contracted = [c for c in rhs if c in lhs]
    features = [c for c in rhs if c in out]
    if not contracted or not features:
        return None, "the kernel has no contracted axis or no feature axis"
    free = [c for c in lhs if c in out]
    inter = free + features
    perm = tuple(rhs.index(c) for c in contracted + features)
    out_perm = tuple(inter.index(c) for c in out)
    return (
        Contraction(
            Layout(perm, len(contracted)),
            x_contract=tuple(lhs.index(c) for c in contracted),
            x_free=tuple(lhs.index(c) for c in free),
            x_summed=tuple(i for i, c in enumerate(lhs) if c not in rhs and c not in out),
            out_perm=None if out_perm == tuple(range(len(out))) else out_perm,
        ),
        "",
    )


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


def contract(x: jax.Array, ct2: CompressedTensor, c: Contraction, kernel_shape: Sequence[int], *, dtype, precision) -> jax.Array:
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


def accumulation(x: jax.Array, dtype, preferred_element_type) -> tuple[jax.Array, Any]:
    """flax's ``preferred_element_type``: ``x`` widened to it where it is wider, and the result dtype."""
    if preferred_element_type is None:
        return x, dtype
    return x.astype(jnp.promote_types(x.dtype, preferred_element_type)), preferred_element_type


def out_sharded(y: jax.Array, out_sharding: Any) -> jax.Array:
    """flax nnx's ``out_sharding`` (explicit-sharding mode): the result resharded as ``lax.dot_general`` would."""
    return y if out_sharding is None else jax.sharding.reshard(y, out_sharding)
