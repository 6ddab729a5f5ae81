"""`decompress` of the bitmask and int4 codecs on the CPU handlers (`ltjax.ffi.cpu`): about 4.5x XLA's gather."""

from __future__ import annotations

import jax

from ltjax._format import CompressedTensor, from_storage
from ltjax.ops import _cpu
from ltjax.ops._dispatch import Implementation


def why_not(ct: CompressedTensor, *, platform: str, interpret: bool) -> str | None:
    return _cpu.reason(ct) or _cpu.handlers.why_not_unpack(ct)


def run(ct: CompressedTensor, *, interpret: bool) -> jax.Array:
    return from_storage(_cpu.handlers.unpack(ct), ct.header)


IMPL = Implementation("ffi", ("cpu",), False, why_not, run)
