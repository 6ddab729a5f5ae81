"""`ltjax.matmul` on the CPU handlers (`ltjax.ffi.cpu`, XLA FFI custom calls): int8, int4 and bitmask codecs.

Chosen up to `max_m` rows of x: above it the XLA path's chunked dots beat the handlers' GEMM
(docs/ffi.md, "Prefill crossover"): `MAX_M` rows, 256 for int4 (`MAX_M_BY_CODEC`: SmolLM2's
128-token prefill), any M for the int8 GEMM on AMX tiles (measured to 1024); the backward's
``dx`` (an f32 kernel) stays on the handlers up to `MAX_M` only. Chosen only when
the program is traced on a CPU host (the extension and its ISA are this host's) and on one
device (a custom call is not partitioned: its operands would be all-gathered).
"""

from __future__ import annotations

import jax

from ltjax._format import CompressedTensor
from ltjax.ops import _cpu
from ltjax.ops._dispatch import Implementation

MAX_M = 64
MAX_M_BY_CODEC = {"int4": 256}


def _amx_int8(ct: CompressedTensor) -> bool:
    return ct.codec == "int8" and _cpu.handlers is not None and bool(_cpu.handlers.info().get("amx"))


def _reason(a: jax.Array, ct: CompressedTensor, *, transpose: bool) -> str | None:
    why = _cpu.reason(a, ct)
    if why is not None:
        return why
    if transpose:  # the transposed handlers take what the forward ones take, for dy [M, N]
        a = jax.ShapeDtypeStruct((a.shape[0], ct.shape[0]), a.dtype)
    return _cpu.handlers.why_not(a, ct)


def max_m(ct: CompressedTensor) -> int | None:
    """The most rows of x the forward handlers are preferred for (None: any)."""
    return None if _amx_int8(ct) else MAX_M_BY_CODEC.get(ct.codec, MAX_M)


def prefer(x2, ct, *, platform: str) -> str | None:
    if x2.shape[0] <= MAX_M:
        return None
    limit = max_m(ct)
    if limit is not None and x2.shape[0] > limit:
        return f"M={x2.shape[0]} > {limit}: the XLA path's chunked dots are faster there for {ct.codec}"
    return None


def prefer_t(dy2, ct, *, platform: str) -> str | None:
    if dy2.shape[0] > MAX_M:  # the transposed kernel is the f32 one, even on AMX
        return f"M={dy2.shape[0]} > {MAX_M}: the XLA path's chunked dots are faster there"
    return None


def why_not(x2, ct, *, platform: str, interpret: bool) -> str | None:
    return _reason(x2, ct, transpose=False)


def why_not_t(dy2, ct, *, platform: str, interpret: bool) -> str | None:
    return _reason(dy2, ct, transpose=True)


def run(x2: jax.Array, ct: CompressedTensor, *, interpret: bool):
    return _cpu.handlers.matmul(x2, ct).astype(x2.dtype), None


def run_t(dy2: jax.Array, ct: CompressedTensor, *, interpret: bool) -> jax.Array:
    return _cpu.handlers.matmul_t(dy2, ct)


IMPL = Implementation("ffi", ("cpu",), False, why_not, run, prefer=prefer)
IMPL_T = Implementation("ffi", ("cpu",), False, why_not_t, run_t, prefer=prefer_t)
