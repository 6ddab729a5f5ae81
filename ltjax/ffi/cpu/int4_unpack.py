"""Python twin of int4_unpack.cc: codes + group scales (+ mins) -> the dense storage matrix [C, R]."""

from __future__ import annotations

import jax


def int4_unpack(codes, scales, mins=None, *, dtype):
    """Dense storage [C, R] in ``dtype``: ``(q - 8) * s`` (or ``q * s + m`` with ``mins``) in f32, then
    rounded to ``dtype`` (bit-exact against the reference decoder)."""
    c, r = codes.shape[0], 2 * codes.shape[1]
    out = jax.ShapeDtypeStruct((c, r), jax.numpy.dtype(dtype))
    target = "ltjax_int4_unpack" if mins is None else "ltjax_int4_asym_unpack"
    extra = () if mins is None else (mins,)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(codes, scales, *extra)
