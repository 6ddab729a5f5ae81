"""How N-D Flax kernels are stored as the 2-D matmul kernels `ltjax.matmul` takes.

A ``DenseGeneral`` / ``Einsum`` contraction is one matmul ``x2 [M, K] @ W2 [K, N]`` after
moving axes: the kernel's contracted axes first, its feature axes last, flattened. Storing
the kernel in that ``[K, N]`` layout at compress time (`Layout.to_matmul`) lets the fused
kernels run it with no dense copy; the N-D shape alone does not say which axes a module
contracts, so the layout comes from the module (`ltjax.nn.compress_params`' trace,
`ltjax.nnx.compress_model`) or from flax's bias convention (`bias_layouts`).
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array))


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


def contraction_inputs(x: jax.Array, c: Contraction) -> jax.Array:
    """``x`` as the ``[M, K]`` left operand of the contraction's matmul (what `ltjax.matmul` sees)."""
    if c.x_summed:
        x = jnp.sum(x, axis=c.x_summed, keepdims=True)
    k = math.prod(x.shape[a] for a in c.x_contract)
    return jnp.transpose(x, c.x_free + c.x_contract + c.x_summed).reshape(-1, k)


def dense_general_contraction(
    x_ndim: int, n_kernel: int, axis: Sequence[int], batch_dims: Sequence[int]
) -> Contraction | None:
    """flax DenseGeneral / LinearGeneral: ``x``'s ``axis`` against the kernel's leading axes (None with batch dims)."""
    if batch_dims:
        return None
    axis = tuple(a % x_ndim for a in axis)
    free = tuple(a for a in range(x_ndim) if a not in axis)
    return Contraction(Layout(tuple(range(n_kernel)), len(axis)), axis, free)


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


def bias_layouts(flat: list[tuple[str, Any]], stacked: set[str] = frozenset()) -> dict[str, Layout]:
    """flax's DenseGeneral convention: ``kernel [*in, *features]`` beside ``bias [*features]``."""
    leaves = dict(flat)
    out = {}
    for path, leaf in flat:
        bias = leaves.get(path[: -len("kernel")] + "bias") if path.split("/")[-1] == "kernel" else None
        if bias is None or not _is_array(leaf) or not _is_array(bias):
            continue
        lead = int(path in stacked)
        k, b = np.shape(leaf)[lead:], np.shape(bias)[lead:]
        if 0 < len(b) < len(k) and tuple(k[len(k) - len(b):]) == tuple(b):
            out[path] = Layout(tuple(range(len(k))), len(k) - len(b))
    return out


def in_layout(leaf: Any, layout: Layout | None, stacked: bool = False) -> Any:
    """``leaf`` as its ``[K, N]`` matmul kernel where its N-D shape is not already that storage.

    Kept as is: an identity layout with one feature axis (the N-D kernel under the default
    channel axis is the same storage matrix, and keeps its shape) and a transposed layout
    with the kernel's own shape (a square 2-D kernel, where the two could not be told apart).
    """
    if layout is None or not _is_array(leaf):
        return leaf
    shape = np.shape(leaf)[int(stacked):]
    identity = layout.perm == tuple(range(len(shape)))
    if (identity and layout.n_in == len(shape) - 1) or layout.matmul_shape(shape) == tuple(shape):
        return leaf
    return layout.to_matmul(np.asarray(leaf))
