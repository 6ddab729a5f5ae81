"""Numerics that more than one backend uses (the Pallas kernels and the CUDA kernels' wrapper),
kept below both so that neither imports the other."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _bf16_head(a: jax.Array) -> jax.Array:
    """``a`` (f32) with its low 16 bits cleared: its leading 8 significant bits, exactly a bf16 value."""
    bits = lax.bitcast_convert_type(a, jnp.int32) & jnp.int32(-65536)
    return lax.bitcast_convert_type(bits, jnp.float32)


def split_bf16(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """f32 ``a`` as ``hi + mid + lo``, three bf16 terms carrying its 24 significant bits exactly.

    Split by clearing bits, not by rounding through bf16: XLA on GPU may drop an
    f32 -> bf16 -> f32 round trip as excess precision (``a - f32(bf16(a))`` folded to 0), which
    left only ``hi`` and bf16 accuracy (seen on an H200, the Mosaic GPU path's first run).
    Each head is an exact bf16 value and each remainder an exact f32 difference.
    """
    hi = _bf16_head(a)
    r = a - hi
    mid = _bf16_head(r)
    return hi.astype(jnp.bfloat16), mid.astype(jnp.bfloat16), (r - mid).astype(jnp.bfloat16)
