"""One program, a path per platform: ``per_platform(fn_by_platform, *args)``.

The op layer picks an implementation per lowering platform (the Pallas kernels for CUDA, the
CPU handlers for CPU, ...). ``lax.platform_dependent`` stages the choice out, but lowers every
kept branch for every lowering platform: a multi-platform export (``lowering_platforms=
("cpu", "cuda")``) then asks the Pallas branch for a CPU lowering, which Pallas refuses. This
module's primitive has one lowering rule per platform instead, and JAX lowers each rule with
only its own platform in context, so each branch is lowered only where it runs. Single-platform
lowering keeps just the one branch; the compiler never sees the others.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.extend import core as jcore
from jax.interpreters import batching, mlir

from ltjax._config import host_platform

PLATFORMS = ("cpu", "cuda", "rocm")

platform_call_p = jcore.Primitive("ltjax_platform_call")
platform_call_p.multiple_results = True


def _flat(branch: Callable, in_tree):
    """``branch`` on flat arguments returning flat results, and a cell that receives its output tree."""
    tree = []

    def run(*xs):
        leaves, out_tree = jax.tree.flatten(branch(*jax.tree.unflatten(in_tree, xs)))
        tree.append(out_tree)
        return leaves

    return run, tree


_TRACED: dict = {}  # (branch key, avals, in_tree) -> (closed jaxpr, output tree)
_TRACED_MAX = 4096


def _key(branch: Callable):
    """A by-value key for a ``functools.partial`` of a module-level function (None: not cacheable)."""
    if not isinstance(branch, functools.partial) or "<locals>" in getattr(branch.func, "__qualname__", "<locals>"):
        return None
    key = (branch.func, branch.args, tuple(sorted(branch.keywords.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _trace(branch: Callable, avals: tuple, in_tree):
    """(closed jaxpr, output tree) of ``branch``; traced once per branch, shapes and tree where cacheable."""
    key = _key(branch)
    if key is not None and (key, avals, in_tree) in _TRACED:
        return _TRACED[key, avals, in_tree]
    run, tree = _flat(branch, in_tree)
    out = jax.make_jaxpr(run)(*avals), tree[0]
    if key is not None:
        if len(_TRACED) >= _TRACED_MAX:
            _TRACED.clear()
        _TRACED[key, avals, in_tree] = out
    return out


def _aval(a) -> jax.ShapeDtypeStruct:
    """``a``'s abstract value, with its sharding where it has one (explicit-sharding mode)."""
    t = jax.typeof(a)
    sharding = getattr(t, "sharding", None)
    if sharding is not None and getattr(sharding.mesh, "axis_names", ()) and any(sharding.spec):
        return jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(t.shape, t.dtype)


def per_platform(fns: Mapping[str, Callable], default: Callable, *args: Any) -> Any:
    """``fns[platform](*args)`` for the platform the program is lowered for (``default`` elsewhere).

    Every branch takes the same pytree ``args`` (everything it reads: no closed-over tracers)
    and returns the same pytree of arrays. When all branches are the same callable this is a
    plain call.
    """
    branches = tuple(fns.get(p, default) for p in PLATFORMS) + (default,)
    if all(_key(b) == _key(default) if _key(b) is not None else b is default for b in branches):
        return default(*args)
    flat, in_tree = jax.tree.flatten(args)
    avals = tuple(_aval(a) for a in flat)
    traced = [_trace(b, avals, in_tree) for b in branches]
    jaxprs = tuple(j for j, _ in traced)
    if any(t != traced[0][1] for _, t in traced) or any(j.out_avals != jaxprs[0].out_avals for j in jaxprs):
        raise ValueError(f"per_platform: the branches return different types: {[j.out_avals for j in jaxprs]}")
    return jax.tree.unflatten(traced[0][1], platform_call_p.bind(*flat, jaxprs=jaxprs))


def _branch(jaxprs, platform: str | None) -> jcore.ClosedJaxpr:
    return jaxprs[PLATFORMS.index(platform)] if platform in PLATFORMS else jaxprs[-1]


@platform_call_p.def_abstract_eval
def _abstract_eval(*avals, jaxprs):
    return jaxprs[-1].out_avals


@platform_call_p.def_impl
def _impl(*args, jaxprs):
    return jcore.jaxpr_as_fun(_branch(jaxprs, host_platform()))(*args)


def _lowering(platform: str | None):
    def rule(ctx, *args, jaxprs):
        return mlir.lower_fun(jcore.jaxpr_as_fun(_branch(jaxprs, platform)), multiple_results=True)(ctx, *args)
    return rule


for _p in PLATFORMS:
    mlir.register_lowering(platform_call_p, _lowering(_p), platform=_p)
mlir.register_lowering(platform_call_p, _lowering(None))


def _batch(args, dims, *, jaxprs):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [a if d is None else jax.numpy.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    in_axes = tuple(None if d is None else 0 for d in dims)
    avals = [_aval(a) for a in args]
    batched = {}  # a jaxpr shared by several platforms is batched once
    for j in jaxprs:
        if id(j) not in batched:
            batched[id(j)] = jax.make_jaxpr(jax.vmap(jcore.jaxpr_as_fun(j), in_axes=in_axes, axis_size=size))(*avals)
    return platform_call_p.bind(*args, jaxprs=tuple(batched[id(j)] for j in jaxprs)), [0] * len(jaxprs[-1].out_avals)


batching.primitive_batchers[platform_call_p] = _batch
