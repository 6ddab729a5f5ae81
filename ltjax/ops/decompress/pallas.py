"""`decompress` on the Pallas GPU kernels (`ltjax.pallas`): unpack and dequantise in registers."""

from __future__ import annotations

import jax

from ltjax._format import CompressedTensor
from ltjax.ops._dispatch import Implementation, explicit_sharding

try:
    from ltjax import pallas as _pallas
except ImportError:  # pragma: no cover - an installation without Pallas
    _pallas = None


def why_not(ct: CompressedTensor, *, platform: str, interpret: bool) -> str | None:
    if _pallas is None:
        return "ltjax.pallas is not available in this installation"
    if ct.codec not in _pallas.DECOMPRESS_CODECS:
        return f"the Pallas kernels decode {', '.join(_pallas.DECOMPRESS_CODECS)}, not {ct.codec!r}"
    sharded = explicit_sharding(ct)
    return None if sharded is None else f"the kernels take unsharded operands; {sharded} is sharded"


def run(ct: CompressedTensor, *, interpret: bool) -> jax.Array:
    return _pallas.decompress(ct, interpret=interpret)


IMPL = Implementation("pallas", ("cuda", "rocm"), True, why_not, run)
