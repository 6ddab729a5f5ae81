"""The public op layer: `decompress` and `matmul` on `CompressedTensor`s.

(Placeholder: reference implementations only; custom VJPs and dispatch to the Pallas / FFI
fast paths are built on top of these in the ops work.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ltjax._format import CompressedTensor, decompress_reference


def decompress(ct: CompressedTensor) -> jax.Array:
    """The dense logical tensor of ``ct`` (jittable)."""
    with jax.named_scope("ltjax.decompress"):
        return decompress_reference(ct)


def matmul_reference(x: jax.Array, ct: CompressedTensor) -> jax.Array:
    """``x[..., K] @ W[K, N]`` by decoding ``W`` first: the ground truth for every fast path."""
    w = decompress_reference(ct)
    dtype = jnp.result_type(x.dtype, w.dtype)
    return jnp.matmul(x.astype(dtype), w.astype(dtype))


def matmul(x: jax.Array, ct: CompressedTensor, *, impl: str | None = None) -> jax.Array:
    """``x[..., K] @ W[K, N]`` where ``ct`` holds ``W`` (logical [K, N], the flax Dense kernel)."""
    with jax.named_scope("ltjax.matmul"):
        return matmul_reference(x, ct)
