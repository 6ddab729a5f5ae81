"""The dense logical tensor in pure jnp: the numerical ground truth of every decoder, and the fallback."""

from __future__ import annotations

import jax

from ltjax._format import CompressedTensor, decode_storage, from_storage
from ltjax.ops._dispatch import ANYWHERE, Implementation


def decompress_reference(ct: CompressedTensor, dtype=None) -> jax.Array:
    """The dense logical tensor of ``ct`` (stacked tensors: ``stack_shape + shape``), in its own
    dtype or ``dtype`` (``codes * scales`` computed in f32 and rounded once, to that dtype)."""
    decode = lambda c: from_storage(decode_storage(c, dtype), c.header)  # noqa: E731
    for _ in ct.stack_shape:
        decode = jax.vmap(decode)
    return decode(ct)


def why_not(ct: CompressedTensor, *, platform: str, interpret: bool) -> str | None:
    return None


def run(ct: CompressedTensor, *, interpret: bool) -> jax.Array:
    return decompress_reference(ct)


IMPL = Implementation("reference", ANYWHERE, False, why_not, run)
