"""`ltjax.matmul` and `ltjax.explain`: ``x[..., K] @ W[K, N]`` with ``W`` compressed, and why it runs where.

Implementations, in order of preference (`IMPLEMENTATIONS`): the CUDA small-M kernels
(opt-in), the Pallas GPU kernels, the CPU handlers, the fused XLA path, the pure-jnp reference.
The backward's ``dx = dy @ W^T`` walks its own registry (`TRANSPOSES`): an implementation
without a transposed kernel hands it to the next one that has one.

One custom VJP for all of them. Residuals are ``x``, the compressed tensor and, on the XLA
path, the unscaled accumulator ``x @ codes^T`` that the scale gradient needs (elsewhere it is
recomputed with unit scales on the same implementation), never a dense weight. Float leaves get
cotangents: ``scales`` (``ds[n] = sum_m dy[m, n] acc[m, n]``), ``values`` of ``raw`` (dense, as
the weight is) and of ``bitmask`` (at each packed position); integer leaves get float0 zeros.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ltjax._config import host_platform
from ltjax._format import CompressedTensor
from ltjax._platform import PLATFORMS
from ltjax.ops import _dispatch
from ltjax.ops._common import F32, cotangent, float_leaves, has_scales, int4_grads, packed_positions
from ltjax.ops._dispatch import Config, Explanation, Plan
from ltjax.ops.matmul import cpu, cuda, pallas, reference, xla
from ltjax.ops.matmul.reference import matmul_reference

IMPLEMENTATIONS = (cuda.IMPL, pallas.IMPL, cpu.IMPL, xla.IMPL, reference.IMPL)
TRANSPOSES = (pallas.IMPL_T, cpu.IMPL_T, xla.IMPL_T, reference.IMPL_T)
_FORWARD = {i.name: i for i in IMPLEMENTATIONS}
_TRANSPOSE = {i.name: i for i in TRANSPOSES}


@dataclasses.dataclass(frozen=True, slots=True)
class Choice:
    """The forward's implementation and the backward ``dx``'s, on one platform."""

    fwd: Config
    dx: Config


def _dy(x2, ct: CompressedTensor) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((x2.shape[0], ct.shape[1]), x2.dtype)


def _choice(x2, ct: CompressedTensor, impl: str | None, platform: str) -> Choice:
    dy2 = _dy(x2, ct)
    if impl is None:
        fwd = _dispatch.choose(IMPLEMENTATIONS, (x2, ct), platform, what="matmul")
    else:
        fwd = _dispatch.forced(IMPLEMENTATIONS, impl, (x2, ct), what="matmul")
    same = _TRANSPOSE.get(fwd.impl)  # its own transposed kernel, run the same way, where it has one
    if same is not None:  # (impl=None also asks whether it is the one to prefer at this M)
        why = same.reason(dy2, ct, platform=platform, interpret=fwd.interpret) if impl is not None else \
            same.default_reason(dy2, ct, platform=platform)
        if why is None:
            return Choice(fwd, Config(fwd.impl, fwd.interpret))
    return Choice(fwd, _dispatch.choose(TRANSPOSES, (dy2, ct), platform, what="matmul dx"))


def _plan(x2, ct: CompressedTensor, impl: str | None) -> Plan:
    if impl is not None:
        return Plan.everywhere(_choice(x2, ct, impl, host_platform()))
    default = Choice(Config("xla"), Config("xla")) if xla.why_not(x2, ct, platform="", interpret=False) is None \
        else Choice(Config("reference"), Config("reference"))
    return Plan.build(lambda p: _choice(x2, ct, None, p), default)


# ---------------------------------------------------------------------- the one VJP
def _forward(c: Choice, x2: jax.Array, ct: CompressedTensor):
    """(y in x's dtype, the f32 unscaled accumulator where the implementation has it for free, else None)."""
    return _FORWARD[c.fwd.impl].run(x2, ct, interpret=c.fwd.interpret)


def _forward_y(c: Choice, x2, ct):
    return _forward(c, x2, ct)[0]


def _forward_acc(c: Choice, x2, ct):
    """`_forward` with an accumulator on every platform: the XLA path's, or zeros the others never read."""
    y, acc = _forward(c, x2, ct)
    return y, (jnp.zeros((x2.shape[0], ct.shape[1]), jnp.float32) if acc is None else acc)


def _backward(c: Choice, x2, ct: CompressedTensor, acc, dy) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(dx, the cotangents of ``ct``'s float leaves) on one platform's choice."""
    floats = float_leaves(ct)
    if c.fwd.impl == "reference":  # the ground truth's backward is its own autodiff
        dx, bar = jax.vjp(matmul_reference, x2, ct)[1](dy)
        return dx, {f: getattr(bar, f) for f in floats}
    dx = _TRANSPOSE[c.dx.impl].run(dy, ct, interpret=c.dx.interpret).astype(x2.dtype)
    dyf, xf = dy.astype(jnp.float32), x2.astype(jnp.float32)
    cots: dict[str, Any] = {}
    if ct.codec == "raw":  # dW^T = dy^T x, dense because the weight is
        cots["values"] = lax.dot_general(dyf, xf, (((0,), (0,)), ((), ())), precision=F32).astype(ct.values.dtype)
    elif ct.codec == "int4":  # per-group scales (and mins) from dW = dy^T x, a chunk of rows at a time
        cots.update(int4_grads(ct, lambda start, size: lax.dot_general(
            lax.dynamic_slice_in_dim(dyf, start, size, 1), xf, (((0,), (0,)), ((), ())), precision=F32)))
    elif ct.codec == "bitmask":
        rows, cols = packed_positions(ct)
        dv = jnp.sum(jnp.take(dyf, rows, axis=1) * jnp.take(xf, cols, axis=1), axis=0)
        cots["values"] = dv.astype(ct.values.dtype)
    if has_scales(ct):
        if c.fwd.impl != "xla":  # recompute x @ codes^T with unit scales on the same implementation
            acc = _forward(c, xf, dataclasses.replace(ct, scales=jnp.ones_like(ct.scales)))[0]
        cots["scales"] = jnp.sum(dyf * acc, axis=0)
    return dx, {f: cots.get(f, jnp.zeros(a.shape, a.dtype)) for f, a in floats.items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul2(plan: Plan, x2: jax.Array, ct: CompressedTensor) -> jax.Array:
    return _dispatch.run(plan, _forward_y, x2, ct)


def _matmul2_fwd(plan, x2, ct):
    if plan.single is not None:
        y, acc = _forward(plan.single, x2, ct)
    else:
        y, acc = _dispatch.run(plan, _forward_acc, x2, ct)
    return y, (x2, ct, acc)


def _matmul2_bwd(plan, res, dy):
    x2, ct, acc = res
    if plan.single is not None:
        dx, cots = _backward(plan.single, x2, ct, acc, dy)
    else:
        dx, cots = _dispatch.run(plan, _backward, x2, ct, acc, dy)
    return dx, cotangent(ct, **cots)


_matmul2.defvjp(_matmul2_fwd, _matmul2_bwd)


# ---------------------------------------------------------------------- public
def _check(x: Any, ct: Any) -> None:
    if not isinstance(ct, CompressedTensor):
        raise ValueError(f"ltjax.matmul needs a CompressedTensor as ct, got {type(ct).__name__}")
    if ct.ndim != 2:
        raise ValueError(f"ltjax.matmul needs a 2-D CompressedTensor (logical [K, N]); got ct.shape={ct.shape}")
    shape = tuple(np.shape(x))
    if len(shape) < 1 or shape[-1] != ct.shape[0]:
        raise ValueError(
            f"ltjax.matmul: x.shape={shape} does not match ct.shape={ct.shape}: "
            f"x[..., K] @ W[K, N] needs x.shape[-1] == K == {ct.shape[0]}"
        )
    dt = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"ltjax.matmul needs a floating-point x (float32, bfloat16, float16); got x.dtype={dt} "
                         f"with x.shape={shape}, ct.shape={ct.shape}")


def matmul(x: jax.Array, ct: CompressedTensor, *, impl: str | None = None) -> jax.Array:
    """``x[..., K] @ W[K, N]`` where ``ct`` holds ``W`` (logical [K, N], the flax Dense kernel).

    Accumulates in f32 and returns ``x.dtype``. Jittable, vmappable, differentiable w.r.t. ``x``
    and the float leaves of ``ct``. ``impl``: ``None`` (on each platform the program is lowered
    for, the first of `IMPLEMENTATIONS` that can run; `explain` says which and why), or one of
    ``"cuda"``, ``"pallas"``, ``"ffi"``, ``"xla"``, ``"reference"`` everywhere (``ValueError`` with
    the reason where it cannot run; emulated off its platform where it has an emulation).
    """
    _check(x, ct)
    x = jnp.asarray(x)
    with jax.named_scope("ltjax.matmul"):
        k, n = ct.shape
        x2 = x.reshape(-1, k)
        return _matmul2(_plan(x2, ct, impl), x2, ct).reshape(x.shape[:-1] + (n,))


def explain(x: Any, ct: CompressedTensor, *, impl: str | None = None, platform: str | None = None) -> Explanation:
    """The path ``matmul(x, ct, impl=impl)`` takes when lowered for ``platform`` (default: this host's),
    and for every other implementation why not. ``x`` may be a `jax.ShapeDtypeStruct`.

    >>> import numpy as np, jax, ltjax
    >>> ct = ltjax.compress(np.ones((256, 128), np.float32), "int8")
    >>> e = ltjax.explain(jax.ShapeDtypeStruct((1, 256), np.float32), ct, platform="cuda")
    >>> e.impl, e.reasons["ffi"]
    ('pallas', "runs on cpu; the platform is 'cuda'")
    """
    _check(x, ct)
    platform = platform or host_platform()
    x2 = jax.ShapeDtypeStruct((int(np.prod(np.shape(x)[:-1], dtype=np.int64)), ct.shape[0]), x.dtype)
    plan = _plan(x2, ct, impl)
    choice = plan.of(platform)
    return Explanation(
        op="matmul",
        what=f"x{list(x2.shape)} {np.dtype(x.dtype).name} @ {ct!r}",
        platform=platform,
        impl=choice.fwd.impl,
        interpret=choice.fwd.interpret,
        reasons=_dispatch.reasons(IMPLEMENTATIONS, (x2, ct), platform),
        platforms={p: plan.of(p).fwd.impl for p in PLATFORMS},
        backward=f"dx: {choice.dx.impl}" + (" (emulated)" if choice.dx.interpret else ""),
    )


def matmul_impl(x: Any, ct: CompressedTensor, *, impl: str | None = None, platform: str | None = None) -> str:
    """The implementation ``matmul`` runs (``explain(...).impl``); kept for one release, use `explain`."""
    return explain(x, ct, impl=impl, platform=platform).impl
