"""The bit packing of training residuals (`ltjax.nn.relu`, `ltjax.compressed_residual`): one op, two implementations.

`pack_mask` / `unpack_mask` (a bool mask, 1 bit per element) and `pack_sparse` / `unpack_sparse`
(mask words plus the nonzeros, up to a capacity). The Pallas kernels in a program lowered for a
GPU, the pure-jnp reference elsewhere. They have no VJP of their own: the layers that save
residuals with them own theirs (`ltjax._activations`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ltjax.ops import _dispatch
from ltjax.ops._dispatch import Config, Plan
from ltjax.ops.residual import pallas, reference

IMPLEMENTATIONS = (pallas.IMPL, reference.IMPL)
_BY_NAME = {i.name: i for i in IMPLEMENTATIONS}


def _call(name: str, n: int, dtype, static: dict, *args):
    """``name(*args, **static)`` on the implementation each platform picks for ``n`` elements of ``dtype``."""
    plan = Plan.build(lambda p: _dispatch.choose(IMPLEMENTATIONS, (n, dtype), p, what=name), Config("reference"))
    return _dispatch.run(plan, functools.partial(_run_named, name, tuple(sorted(static.items()))), *args)


def _run_named(name: str, static: tuple, cfg: Config, *args):
    return _BY_NAME[cfg.impl].run(name, *args, interpret=cfg.interpret, **dict(static))


def pack_mask(mask: jax.Array) -> jax.Array:
    """Packs a bool mask (any shape, flattened C-order) into uint32 words."""
    return _call("pack_mask", mask.size, jnp.float32, {}, mask)


def unpack_mask(words: jax.Array, n: int) -> jax.Array:
    """The first ``n`` mask bits as a flat bool array."""
    return _call("unpack_mask", n, jnp.float32, {"n": n}, words)


def pack_sparse(x: jax.Array, capacity: int):
    """``(mask words, the first capacity nonzeros in C order, nnz)`` of ``x``."""
    return _call("pack_sparse", x.size, x.dtype, {"capacity": capacity}, x)


def unpack_sparse(words: jax.Array, values: jax.Array, shape, dtype) -> jax.Array:
    """Dense ``x`` from its mask words and packed nonzeros (exact when nnz <= capacity)."""
    static = {"shape": tuple(shape), "dtype": jnp.dtype(dtype)}
    return _call("unpack_sparse", math.prod(shape), dtype, static, words, values)
