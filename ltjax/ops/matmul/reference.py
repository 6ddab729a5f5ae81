"""`x @ W` by decoding ``W`` first, in pure jnp: the numerical ground truth and the last fallback.

Its backward is the autodiff of itself (`ltjax.ops.matmul.api` calls ``jax.vjp`` on it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ltjax._format import CompressedTensor
from ltjax.ops._dispatch import ANYWHERE, Implementation
from ltjax.ops.decompress.reference import decompress_reference


def matmul_reference(x: jax.Array, ct: CompressedTensor) -> jax.Array:
    """``x[..., K] @ W[K, N]`` by decoding ``W`` first, in f32 (returns ``x.dtype``): the ground truth.

    The decoded weight is f32 whatever the tensor's logical dtype: ``codes * scales`` is not
    rounded to bf16 first (every implementation multiplies the codes in f32 too).
    """
    w = decompress_reference(ct, jnp.float32)
    y = jnp.matmul(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def why_not(a: jax.Array, ct: CompressedTensor, *, platform: str, interpret: bool) -> str | None:
    return None


def run(x2: jax.Array, ct: CompressedTensor, *, interpret: bool):
    return matmul_reference(x2, ct), None


def run_t(dy2: jax.Array, ct: CompressedTensor, *, interpret: bool) -> jax.Array:
    w = decompress_reference(ct, jnp.float32)
    return jnp.matmul(dy2.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST)


IMPL = Implementation("reference", ANYWHERE, False, why_not, run)
IMPL_T = Implementation("reference", ANYWHERE, False, why_not, run_t)
