"""`decompress` in plain XLA: the storage rows decoded in place (bitmask codecs by popcount), any platform."""

from __future__ import annotations

import jax

from ltjax._format import CompressedTensor, from_storage
from ltjax.ops._common import base_of, decode_rows, has_scales
from ltjax.ops._dispatch import ANYWHERE, Implementation


def why_not(ct: CompressedTensor, *, platform: str, interpret: bool) -> str | None:
    return None


def run(ct: CompressedTensor, *, interpret: bool) -> jax.Array:
    h = ct.header
    st = decode_rows(ct, base_of(ct), 0, h.storage_shape[0])
    if has_scales(ct):
        st = st * ct.scales[:, None]
    return from_storage(st.astype(ct.dtype), h)


IMPL = Implementation("xla", ANYWHERE, False, why_not, run)
