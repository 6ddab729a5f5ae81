"""The CPU handlers: fused int8 / bitmask matmuls and bitmask unpack as XLA FFI custom calls.

The handlers (C++, AVX-512 VBMI2 or AVX2 chosen at run time, a small thread pool over output
channels) are built by the package install into ``ltjax/ffi/cpu/_ltjax_ffi*.so``, configured
from `ltjax._config.settings()` and registered for platform "cpu" when this package is
imported. Where they are missing, `available()` is False and `unavailable_reason()` says why.
`why_not` / `why_not_unpack` answer whether the handlers can run a call (None) or why not; the
op layer owns the platform and the M at which they pay. See docs/ffi.md.

Weights follow the LT-Block storage layout: a logical [K, N] kernel (channel axis 1) is the
storage matrix W [N, K], one scale per output channel.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ltjax._format import CompressedTensor
from ltjax.ffi.cpu._registry import available, info, unavailable_reason
from ltjax.ffi.cpu.bitmask_matmul import bitmask_matmul, bitmask_matmul_t
from ltjax.ffi.cpu.bitmask_unpack import bitmask_unpack
from ltjax.ffi.cpu.int8_matmul import int8_matmul, int8_matmul_t

__all__ = [
    "MATMUL_CODECS",
    "UNPACK_CODECS",
    "X_DTYPES",
    "available",
    "info",
    "matmul",
    "matmul_t",
    "unavailable_reason",
    "unpack",
    "why_not",
    "why_not_unpack",
]

MATMUL_CODECS = ("int8", "bitmask_int8", "bitmask")  # raw weights are left to XLA's own dot
UNPACK_CODECS = ("bitmask", "bitmask_int8")
X_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))


def why_not(x2: Any, ct: CompressedTensor) -> str | None:
    """Why the handlers cannot run ``x2 [M, K] @ ct`` (None: they can).

    Needs the extension loaded, a codec in `MATMUL_CODECS`, ``ct`` 2-D with channel axis 1
    (logical [K, N], storage [N, K]) and ``x2[..., K]`` in f32 or bf16.
    """
    if not available():
        return unavailable_reason()
    if ct.codec not in MATMUL_CODECS:
        return f"the CPU handlers multiply {', '.join(MATMUL_CODECS)}, not {ct.codec!r}"
    if ct.ndim != 2 or ct.header.axis != 1:
        return f"the CPU handlers need a 2-D weight stored [N, K] (axis=1); got shape={ct.shape} axis={ct.header.axis}"
    if np.dtype(x2.dtype) not in X_DTYPES:
        return f"the CPU handlers take float32/bfloat16 x, got {np.dtype(x2.dtype)}"
    if x2.ndim < 1 or x2.shape[-1] != ct.shape[0]:
        return f"x{tuple(x2.shape)} does not match the weight's K={ct.shape[0]}"
    return None


def why_not_unpack(ct: CompressedTensor) -> str | None:
    """Why the handlers cannot unpack ``ct`` to its dense storage matrix (None: they can; any shape)."""
    if not available():
        return unavailable_reason()
    if ct.codec not in UNPACK_CODECS:
        return f"the CPU handlers unpack {' and '.join(UNPACK_CODECS)}, not {ct.codec!r}"
    return None


def _check(ct: CompressedTensor) -> None:
    if ct.codec not in MATMUL_CODECS:
        raise ValueError(f"ltjax.ffi.cpu multiplies codecs {MATMUL_CODECS}, got {ct.codec=}")
    if ct.ndim != 2 or ct.header.axis != 1:
        raise ValueError(f"ltjax.ffi.cpu needs a 2-D weight with channel axis 1, got shape={ct.shape} "
                         f"axis={ct.header.axis}")


def matmul(x2: jax.Array, ct: CompressedTensor) -> jax.Array:
    """``x2[..., K] @ W[K, N]`` in x's dtype (f32 accumulation); ``ct`` logical [K, N], storage [N, K].

    Not differentiable by itself: the op layer's custom VJP calls `matmul_t` for dx.
    """
    _check(ct)
    lead = x2.shape[:-1]
    a = x2.reshape(-1, x2.shape[-1])
    with jax.named_scope("ltjax.ffi.cpu.matmul"):
        if ct.codec == "int8":
            y = int8_matmul(a, ct.codes, ct.scales)
        else:
            y = bitmask_matmul(a, ct.mask, ct.offsets, ct.codes if ct.codec == "bitmask_int8" else ct.values,
                               ct.scales if ct.codec == "bitmask_int8" else None, tile=ct.tile)
    return y.reshape(*lead, y.shape[-1])


def matmul_t(dy2: jax.Array, ct: CompressedTensor) -> jax.Array:
    """``dy2[..., N] @ W[K, N].T`` → ``[..., K]`` in dy's dtype: the backward of `matmul` for x."""
    _check(ct)
    lead = dy2.shape[:-1]
    a = dy2.reshape(-1, dy2.shape[-1])
    with jax.named_scope("ltjax.ffi.cpu.matmul_t"):
        if ct.codec == "int8":
            y = int8_matmul_t(a, ct.codes, ct.scales)
        else:
            y = bitmask_matmul_t(a, ct.mask, ct.offsets, ct.codes if ct.codec == "bitmask_int8" else ct.values,
                                 ct.scales if ct.codec == "bitmask_int8" else None, k=ct.shape[0], tile=ct.tile)
    return y.reshape(*lead, y.shape[-1])


def unpack(ct: CompressedTensor) -> jax.Array:
    """The dense storage matrix [C, R] of a bitmask / bitmask_int8 tensor, in its logical dtype
    (bit-exact for ``bitmask``, -0.0 included)."""
    if ct.codec not in UNPACK_CODECS:
        raise ValueError(f"ltjax.ffi.cpu.unpack handles codecs {UNPACK_CODECS}, got {ct.codec=}")
    with jax.named_scope("ltjax.ffi.cpu.unpack"):
        if ct.codec == "bitmask":
            return bitmask_unpack(ct.mask, ct.offsets, ct.values, shape=ct.header.storage_shape, dtype=ct.dtype,
                                  tile=ct.tile)
        return bitmask_unpack(ct.mask, ct.offsets, ct.codes, ct.scales, shape=ct.header.storage_shape,
                              dtype=ct.dtype, tile=ct.tile)
