"""`ltjax.matmul` on the Pallas GPU kernels (`ltjax.pallas`): decode fused into the matmul, in registers."""

from __future__ import annotations

import jax

from ltjax._format import CompressedTensor
from ltjax.ops._dispatch import Implementation, explicit_sharding

try:
    from ltjax import pallas as _pallas
except ImportError:  # pragma: no cover - an installation without Pallas
    _pallas = None


def _reason(a: jax.Array, ct: CompressedTensor, *, platform: str, interpret: bool, transpose: bool) -> str | None:
    if _pallas is None:
        return "ltjax.pallas is not available in this installation"
    sharded = explicit_sharding(a, ct)
    if sharded is not None:
        return f"the kernels take unsharded operands; {sharded} is sharded along an explicit mesh axis"
    return _pallas.why_not_pallas(a, ct, transpose=transpose, interpret=True)  # the platform is checked by the registry


def why_not(x2, ct, *, platform: str, interpret: bool) -> str | None:
    return _reason(x2, ct, platform=platform, interpret=interpret, transpose=False)


def why_not_t(dy2, ct, *, platform: str, interpret: bool) -> str | None:
    return _reason(dy2, ct, platform=platform, interpret=interpret, transpose=True)


def run(x2: jax.Array, ct: CompressedTensor, *, interpret: bool):
    return _pallas.matmul(x2, ct, interpret=interpret).astype(x2.dtype), None


def run_t(dy2: jax.Array, ct: CompressedTensor, *, interpret: bool) -> jax.Array:
    return _pallas.matmul_t(dy2, ct, interpret=interpret)


IMPL = Implementation("pallas", ("cuda", "rocm"), True, why_not, run)
IMPL_T = Implementation("pallas", ("cuda", "rocm"), True, why_not_t, run_t)
