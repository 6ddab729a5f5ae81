"""Residual bit packing on the Pallas GPU kernels (`ltjax.pallas.residual`)."""

from __future__ import annotations

import jax.numpy as jnp

from ltjax.ops._dispatch import Implementation

try:
    from ltjax.pallas import residual as _kernels
except ImportError:  # pragma: no cover - an installation without Pallas
    _kernels = None


def why_not(n: int, dtype, *, platform: str, interpret: bool) -> str | None:
    if _kernels is None:
        return "ltjax.pallas is not available in this installation"
    if jnp.dtype(dtype).itemsize not in (2, 4):
        return f"dtype={jnp.dtype(dtype)} is not a 16- or 32-bit float"
    if n >= 2**31:
        return f"{n=} does not fit int32 positions"
    return None


def run(name: str, *args, interpret: bool, **static):
    return getattr(_kernels, name)(*args, interpret=interpret, **static)


IMPL = Implementation("pallas", ("cuda", "rocm"), True, why_not, run)
