"""Compressed activation residuals: a 1-bit-mask ReLU and sparse saved inputs.

Two ops keep what the backward pass needs in a compressed form, inside custom-VJP
residuals only (never as primal outputs or scan carries, where they would get silent
zero gradients):

* :func:`relu` -- forward is exactly ``jax.nn.relu(x)``; the residual is the sign mask
  ``x > 0`` packed into uint32 words (1 bit per element). The backward is
  ``where(mask, g, 0)``, the same ``select`` that ``jax.nn.relu``'s JVP uses, so
  gradients are bit-identical (including the gradient 0 at ``x == 0``).
* :func:`compressed_residual` / :func:`sparse_dense` -- ``fn(x, *args)`` with ``x``
  saved for the backward as a bitmask plus its packed nonzero values. The backward
  unpacks ``x`` and runs ``jax.vjp(fn, x, *args)``: the same ops as ``jax.grad`` of
  ``fn``, so the cotangents are bit-identical to the dense ones.

Capacity and overflow. Inside ``jit`` the number of nonzeros is not static, so the
packed-value buffer has a static length ``ceil(capacity * x.size)``. XLA allocates
every buffer statically: a residual that could hold a dense ``x`` on overflow costs a
dense ``x`` always, so no single compiled program can both save memory and store an
overflowing tensor. ltjax therefore never stores a truncated tensor silently:

1. On overflow (``nnz > capacity``) the op's float cotangents are NaN (never a wrong
   finite number), and the event is counted (:func:`overflow_events`, fed by a
   ``jax.debug.callback`` in the forward rule, usable under ``jit``).
2. :func:`value_and_grad_exact` is the exact scheme for training: it runs the
   compressed program and, only when a compressed residual overflowed, reruns the
   step with dense residuals (a second compiled program, traced under
   :func:`dense_residuals`). The returned gradients are always those of the dense model.
3. ``capacity=1.0`` (or :func:`dense_residuals`) stores ``x`` dense: exact, no saving.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ltjax.ops.residual import (  # the pack/unpack op and its reference
    pack_mask,
    pack_sparse,
    unpack_mask,
    unpack_sparse,
)

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 0.5
"""Packed-value capacity used when none is given: a fraction of ``x.size``.

Post-ReLU hidden activations of the digits MLP in ``benchmarks/activations.py`` measured
about 0.7-0.8 sparse; 0.5 leaves room for denser batches and early training. Use
:func:`suggest_capacity` on a sample batch for a tighter, measured value."""

# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _check_float(name: str, x: Any) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"ltjax.{name} needs a floating-point input, got {dtype=}")


def _check_capacity(capacity: Any) -> float:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, float, np.floating, np.integer)):
        raise ValueError(f"{capacity=} must be a Python float in (0, 1]")
    capacity = float(capacity)
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"{capacity=} must be in (0, 1]: the fraction of x.size kept as packed values")
    return capacity


def capacity_count(capacity: float, n: int) -> int:
    """Static length of the packed-value buffer for ``n`` elements."""
    return max(1, min(n, math.ceil(capacity * n)))


def suggest_capacity(x, *, headroom: float = 1.5, floor: float = 0.05) -> float:
    """A measured capacity: ``headroom`` times the density of a sample ``x``, in (0, 1]."""
    x = np.asarray(x)
    density = float(np.count_nonzero(x)) / max(1, x.size)
    return float(min(1.0, max(floor, density * headroom)))


# --------------------------------------------------------------------------------------
# Overflow reporting
# --------------------------------------------------------------------------------------

_overflow_lock = threading.Lock()
_overflow_count = 0


def _record_overflow(flag) -> None:
    global _overflow_count
    n = int(np.sum(np.asarray(flag)))
    if n:
        with _overflow_lock:
            _overflow_count += n


def overflow_events() -> int:
    """Number of compressed residuals that overflowed their capacity so far.

    Counted from the forward rule with ``jax.debug.callback``; call
    ``jax.effects_barrier()`` first to be sure all dispatched steps have reported.
    """
    return _overflow_count


def reset_overflow_events() -> None:
    """Sets the :func:`overflow_events` counter back to 0."""
    global _overflow_count
    with _overflow_lock:
        _overflow_count = 0


_DENSE = contextvars.ContextVar("ltjax_dense_residuals", default=False)


@contextlib.contextmanager
def dense_residuals():
    """Within this context (at trace time) compressed residual ops save ``x`` dense.

    Used by :func:`value_and_grad_exact` for its fallback program. Like any trace-time
    switch, it affects functions traced inside it: give each setting its own ``jax.jit``.
    """
    token = _DENSE.set(True)
    try:
        yield
    finally:
        _DENSE.reset(token)


# --------------------------------------------------------------------------------------
# relu
# --------------------------------------------------------------------------------------


@jax.custom_vjp
def _relu(x):
    return jax.nn.relu(x)


def _relu_fwd(x):
    return jax.nn.relu(x), pack_mask(x > 0)


def _relu_bwd(words, g):
    mask = unpack_mask(words, g.size).reshape(g.shape)
    return (lax.select(mask, g, jnp.zeros_like(g)),)


_relu.defvjp(_relu_fwd, _relu_bwd)


def relu(x: jax.Array) -> jax.Array:
    """``jax.nn.relu`` whose backward keeps only a 1-bit sign mask.

    Forward: exactly ``jax.nn.relu(x)``. Residual: ``x > 0`` packed as uint32 words
    (``ceil(x.size / 32)`` words). Gradient: bit-identical to ``jax.grad`` through
    ``jax.nn.relu`` (0 at ``x == 0``, 0 at NaN). Works under ``jit``, ``grad``,
    ``vmap``, ``jax.checkpoint`` and ``lax.scan``.

    >>> import jax.numpy as jnp, ltjax._activations as A
    >>> A.relu(jnp.array([-1.0, 0.0, 2.0]))
    Array([0., 0., 2.], dtype=float32)
    """
    _check_float("relu", x)
    with jax.named_scope("ltjax.relu"):
        return _relu(jnp.asarray(x))


# --------------------------------------------------------------------------------------
# compressed_residual / sparse_dense
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _ResidualConfig:
    """Static configuration of one compressed-residual op (hashable)."""

    fn: Callable[..., Any]
    capacity: float  # in (0, 1]; 1.0 stores x dense
    report_overflow: bool
    x_shape: tuple[int, ...]  # per-example shape (the rules see it unbatched under vmap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _compressed_call(cfg: _ResidualConfig, x, args):
    return cfg.fn(x, *args)


def _compressed_fwd(cfg: _ResidualConfig, x, args):
    y = cfg.fn(x, *args)
    cap = capacity_count(cfg.capacity, x.size)
    if cap >= x.size:
        return y, (x, None, None, args)
    words, values, nnz = pack_sparse(x, cap)
    # The output must wait for the packed residual, or XLA's scheduler sinks the
    # packing into the backward pass and keeps the dense x alive until then.
    y = _after(y, values, words, nnz)
    if cfg.report_overflow:
        jax.debug.callback(_record_overflow, nnz > cap)
    return y, (words, values, nnz, args)


def _compressed_bwd(cfg: _ResidualConfig, res, g):
    stored, values, nnz, args = res
    if values is None:  # dense residual
        x = stored
        overflow = None
    else:
        # The unpack must wait for the cotangent, or XLA hoists every layer's unpack
        # to the start of the backward pass (all dense copies alive at once).
        words, values = _after((stored, values), g)
        x = unpack_sparse(words, values, cfg.x_shape, values.dtype)
        overflow = nnz > values.shape[0]
    _, vjp = jax.vjp(cfg.fn, x, *args)
    cts = vjp(g)
    arg_cts = [c for c in jax.tree.leaves(cts[1:]) if jnp.issubdtype(c.dtype, jnp.inexact)]
    if arg_cts:
        # dx waits for the other cotangents (dW): otherwise XLA defers every layer's dW
        # to the end of the backward pass, keeping each layer's dy and unpacked x alive.
        cts = (_after(cts[0], *arg_cts),) + tuple(cts[1:])
    if overflow is not None:
        cts = jax.tree.map(lambda c: _poison(c, overflow), cts)
    return cts[0], tuple(cts[1:])


_compressed_call.defvjp(_compressed_fwd, _compressed_bwd)


def _zero_from(a) -> jax.Array:
    """A uint32 0 that XLA cannot fold away and that data-depends on ``a``'s first element.

    ``lax.optimization_barrier`` does not survive XLA's CPU pipeline; a data dependency
    does. ``min(bits, 0)`` on an unsigned integer is always 0 (no known-bits folding).
    """
    first = jnp.ravel(a)[0]
    if jnp.issubdtype(first.dtype, jnp.floating):
        uint = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[first.dtype.itemsize]
        first = lax.bitcast_convert_type(first, uint)
    return jnp.minimum(first.astype(jnp.uint32), jnp.uint32(0))


def _after(tree, *deps):
    """``tree`` unchanged bit for bit, but scheduled after ``deps`` are computed."""
    zero = functools.reduce(jnp.bitwise_or, [_zero_from(d) for d in jax.tree.leaves(deps)])

    def tie(a):
        if jnp.issubdtype(a.dtype, jnp.floating):
            # x + (-0.0) == x for every x, including -0.0, +0.0 and NaN payloads.
            neg_zero = lax.bitcast_convert_type(zero | jnp.uint32(0x80000000), jnp.float32)
            return a + neg_zero.astype(a.dtype)
        return a | zero.astype(a.dtype)

    return jax.tree.map(tie, tree)


def _poison(ct, overflow):
    if hasattr(ct, "dtype") and jnp.issubdtype(ct.dtype, jnp.floating):
        return jnp.where(overflow, jnp.full_like(ct, jnp.nan), ct)
    return ct


def compressed_residual(fn: Callable[..., Any], *, capacity: float | None = None,
                        report_overflow: bool = True) -> Callable[..., Any]:
    """Wraps ``fn(x, *args)`` so that ``x`` is saved for the backward compressed.

    The saved residual is ``x``'s nonzero bitmask (1 bit per element) plus its first
    ``ceil(capacity * x.size)`` nonzero values (C order) and the nonzero count; ``args``
    (typically parameters) are saved as they are. The backward unpacks ``x`` and
    applies ``jax.vjp(fn, x, *args)``: cotangents are bit-identical to those of ``fn``.
    ``fn`` is recomputed in the backward from the unpacked ``x`` (as ``jax.checkpoint``
    would), so it should be cheap or linear in ``x`` (a dense layer, a conv).

    Overflow (more nonzeros than the capacity) makes the op's float cotangents NaN and
    counts an event (:func:`overflow_events`); :func:`value_and_grad_exact` turns this
    into exact gradients by rerunning the step with dense residuals.

    Args:
      fn: a function of a floating-point array ``x`` and further arrays.
      capacity: fraction of ``x.size`` kept as packed values, in (0, 1]; default
        :data:`DEFAULT_CAPACITY`. ``1.0`` saves ``x`` dense.
      report_overflow: count overflow events with a ``jax.debug.callback``.
    """
    capacity = DEFAULT_CAPACITY if capacity is None else _check_capacity(capacity)
    if not callable(fn):
        raise ValueError(f"compressed_residual needs a callable fn, got {fn=}")

    def wrapped(x, *args):
        _check_float("compressed_residual", x)
        x = jnp.asarray(x)
        cap = 1.0 if _DENSE.get() else capacity
        cfg = _ResidualConfig(fn=fn, capacity=cap, report_overflow=report_overflow,
                              x_shape=tuple(x.shape))
        with jax.named_scope("ltjax.compressed_residual"):
            return _compressed_call(cfg, x, tuple(args))

    return wrapped


def dense_reference(x, kernel, bias=None):
    """``x @ kernel + bias`` as ``flax.linen.Dense`` writes it (the sparse_dense reference)."""
    y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def sparse_dense(x, kernel, bias=None, *, capacity: float | None = None,
                 report_overflow: bool = True):
    """A dense layer ``x @ kernel + bias`` whose saved input ``x`` is bitmask-compressed.

    ``dW = xᵀ·dy`` needs ``x``; here ``x`` is saved as a bitmask + packed nonzeros
    (see :func:`compressed_residual`), so a post-ReLU input at sparsity ``s`` costs
    ``1/32 + capacity`` of its dense bytes instead of 1. Gradients are bit-identical to
    ``jax.grad(dense_reference)`` while ``nnz <= capacity * x.size``; on overflow they are
    NaN and an event is counted (never a silently wrong gradient).

    Args:
      x: float array ``[..., K]``.
      kernel: float array ``[K, N]``.
      bias: optional ``[N]``.
      capacity: fraction of ``x.size`` for packed values, in (0, 1].
      report_overflow: count overflow events (:func:`overflow_events`).
    """
    _check_float("sparse_dense", x)
    _check_float("sparse_dense", kernel)
    if bias is not None:
        _check_float("sparse_dense", bias)
    if jnp.ndim(kernel) != 2 or jnp.shape(x)[-1:] != jnp.shape(kernel)[:1]:
        raise ValueError(f"sparse_dense needs x[..., K] and kernel[K, N], got "
                         f"{jnp.shape(x)=} and {jnp.shape(kernel)=}")
    op = compressed_residual(_dense_no_bias if bias is None else dense_reference,
                             capacity=capacity, report_overflow=report_overflow)
    with jax.named_scope("ltjax.sparse_dense"):
        return op(x, kernel) if bias is None else op(x, kernel, bias)


def _dense_no_bias(x, kernel):
    return dense_reference(x, kernel)


# --------------------------------------------------------------------------------------
# Exact training driver
# --------------------------------------------------------------------------------------


def value_and_grad_exact(fun: Callable[..., Any], argnums=0, has_aux: bool = False):
    """``jax.jit(jax.value_and_grad(fun))`` with exact gradients despite overflow.

    Runs ``fun`` with compressed residuals; if any of them overflowed (detected in the
    compiled program, one scalar read back per call), the step is rerun by a second
    program traced under :func:`dense_residuals`, whose gradients are those of the
    dense model. The compressed program keeps its memory saving because the dense one
    is a separate executable. ``.fallbacks`` counts the reruns.
    """
    vg = jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux)

    def with_flag(*args, **kwargs):
        out = vg(*args, **kwargs)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(out[1])
                                    if jnp.issubdtype(g.dtype, jnp.inexact)] or [jnp.array(True)]))
        return out, finite

    compressed = jax.jit(with_flag)
    dense = jax.jit(vg)

    def step(*args, **kwargs):
        out, finite = compressed(*args, **kwargs)
        if bool(finite):
            return out
        step.fallbacks += 1
        with dense_residuals():
            return dense(*args, **kwargs)

    step.fallbacks = 0
    return step
