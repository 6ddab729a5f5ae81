"""`ltjax.matmul` on the CUDA small-M kernels (`ltjax.ffi.cuda`, XLA FFI custom calls), M <= 16.

Opt-in until a GPU has timed them (``LTJAX_CUDA_GEMV=1``, `ltjax._config.EXPERIMENTAL`); forcing
``impl="cuda"`` runs them anyway, and off a CUDA host runs their CPU emulation (built for the
tests). Chosen only when tracing on a CUDA host (their targets register with its runtime). They
have no transposed kernel: the backward's ``dx`` takes the next implementation that has one.
"""

from __future__ import annotations

import jax

from ltjax._config import settings
from ltjax._format import CompressedTensor
from ltjax.ops._dispatch import Implementation, custom_call_reason

try:
    from ltjax.ffi import cuda as _cuda
except ImportError:  # pragma: no cover - an installation without the CUDA kernels' Python side
    _cuda = None


def prefer(x2, ct, *, platform: str) -> str | None:
    return None if settings().cuda_gemv else "opt-in until timed on a GPU: set LTJAX_CUDA_GEMV=1 (or force impl='cuda')"


def why_not(x2: jax.Array, ct: CompressedTensor, *, platform: str, interpret: bool) -> str | None:
    if _cuda is None:
        return "ltjax.ffi.cuda is not available in this installation"
    if not interpret:
        why = custom_call_reason("CUDA kernels", "cuda", x2, ct)
        if why is not None:
            return why
    return _cuda.why_not(x2, ct, emulate=interpret)


def run(x2: jax.Array, ct: CompressedTensor, *, interpret: bool):
    return _cuda.matmul(x2, ct), None  # off a GPU the same target names run the CPU emulation


IMPL = Implementation("cuda", ("cuda",), True, why_not, run, prefer=prefer)
