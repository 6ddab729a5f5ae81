"""`ltjax.decompress`: the dense logical tensor of a `CompressedTensor`, jittable and differentiable.

Implementations, in order of preference: the Pallas kernels (GPU), the CPU handlers (bitmask
codecs), the XLA decoder (anywhere), the pure-jnp reference. The VJP is the same for all: the
cotangent of the dense tensor pulled back to the float leaves (scales, values).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ltjax._config import host_platform
from ltjax._format import CompressedTensor
from ltjax._platform import PLATFORMS
from ltjax.ops import _dispatch
from ltjax.ops._common import base_of, cotangent, decode_rows, int4_grads, packed_positions
from ltjax.ops._dispatch import Config, Explanation, Plan
from ltjax.ops.decompress import cpu, pallas, reference, xla

IMPLEMENTATIONS = (pallas.IMPL, cpu.IMPL, xla.IMPL, reference.IMPL)
_BY_NAME = {i.name: i for i in IMPLEMENTATIONS}


def _plan(ct: CompressedTensor, impl: str | None) -> Plan:
    if impl is not None:
        return Plan.everywhere(_dispatch.forced(IMPLEMENTATIONS, impl, (ct,), what="decompress"))
    return Plan.build(lambda p: _dispatch.choose(IMPLEMENTATIONS, (ct,), p, what="decompress"), Config("xla"))


def _run(cfg: Config, ct: CompressedTensor) -> jax.Array:
    return _BY_NAME[cfg.impl].run(ct, interpret=cfg.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decompress(plan: Plan, ct: CompressedTensor) -> jax.Array:
    return _dispatch.run(plan, _run, ct)


def _fwd(plan, ct):
    return _decompress(plan, ct), ct


def _bwd(plan, ct, g):
    h = ct.header
    c, r = h.storage_shape
    g = jnp.asarray(g).astype(jnp.float32)
    g_st = g.reshape(c, r) if h.axis is None else jnp.moveaxis(g, h.axis, 0).reshape(c, r)
    cots: dict[str, Any] = {}
    if h.codec == "raw":
        cots["values"] = g_st.astype(ct.values.dtype)
    elif h.codec == "int8":
        cots["scales"] = jnp.sum(g_st * ct.codes.astype(jnp.float32), axis=-1)
    elif h.codec == "int4":
        cots.update(int4_grads(ct, lambda start, size: lax.dynamic_slice_in_dim(g_st, start, size, 0)))
    elif h.codec == "bitmask":
        rows, cols = packed_positions(ct)
        cots["values"] = g_st[rows, cols].astype(ct.values.dtype)
    else:
        cots["scales"] = jnp.sum(g_st * decode_rows(ct, base_of(ct), 0, c), axis=-1)
    return (cotangent(ct, **cots),)


_decompress.defvjp(_fwd, _bwd)


def explain(ct: CompressedTensor, *, impl: str | None = None, platform: str | None = None) -> Explanation:
    """The implementation ``decompress(ct, impl=impl)`` runs when lowered for ``platform`` (default:
    this host's), and for every other implementation why not."""
    if not isinstance(ct, CompressedTensor):
        raise ValueError(f"ltjax.decompress needs a CompressedTensor, got {type(ct).__name__}")
    platform = platform or host_platform()
    plan = _plan(ct, impl)
    return Explanation(op="decompress", what=repr(ct), platform=platform, impl=plan.of(platform).impl,
                       interpret=plan.of(platform).interpret,
                       reasons=_dispatch.reasons(IMPLEMENTATIONS, (ct,), platform),
                       platforms={p: plan.of(p).impl for p in PLATFORMS})


def decompress(ct: CompressedTensor, *, impl: str | None = None) -> jax.Array:
    """The dense logical tensor of ``ct`` (jittable; differentiable w.r.t. its float leaves).

    ``impl``: ``None`` (the first of `IMPLEMENTATIONS` that can run on each platform the program
    is lowered for), or one of ``"pallas"``, ``"ffi"`` (bitmask codecs on CPU), ``"xla"``,
    ``"reference"`` everywhere. A stacked tensor (``nn.scan`` layers) decodes layer by layer.
    """
    if not isinstance(ct, CompressedTensor):
        raise ValueError(f"ltjax.decompress needs a CompressedTensor, got {type(ct).__name__}")
    with jax.named_scope("ltjax.decompress"):
        decode = functools.partial(_decompress, _plan(ct, impl))
        for _ in ct.stack_shape:
            decode = jax.vmap(decode)
        return decode(ct)
