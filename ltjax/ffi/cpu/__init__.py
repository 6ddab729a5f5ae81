"""The CPU handlers: fused int8 / bitmask / int4 matmuls and bitmask / int4 unpack as XLA FFI custom calls.

The handlers (C++, AVX-512 VBMI2 or AVX2 chosen at run time, a small thread pool over output
channels) are built by the package install into ``ltjax/ffi/cpu/_ltjax_ffi*.so``, configured
from `ltjax._config.settings()` and registered for platform "cpu" when this package is
imported. Where they are missing, `available()` is False and `unavailable_reason()` says why.
`why_not` / `why_not_unpack` answer whether the handlers can run a call (None) or why not; the
op layer owns the platform and the M at which they pay. See docs/ffi.md.

Weights follow the LT-Block storage layout: a logical [K, N] kernel (channel axis 1) is the
storage matrix W [N, K], one scale per output channel (int4: one per group of G columns of a row).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ltjax._format import INT4_GROUPS, CompressedTensor
from ltjax.ffi.cpu._registry import available, info, unavailable_reason
from ltjax.ffi.cpu.bitmask_matmul import bitmask_matmul, bitmask_matmul_t
from ltjax.ffi.cpu.bitmask_unpack import bitmask_unpack
from ltjax.ffi.cpu.int4_matmul import int4_matmul, int4_matmul_t
from ltjax.ffi.cpu.int4_unpack import int4_unpack
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

MATMUL_CODECS = ("int8", "bitmask_int8", "bitmask", "int4")  # raw weights are left to XLA's own dot
UNPACK_CODECS = ("bitmask", "bitmask_int8", "int4")
X_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))


def why_not(x2: Any, ct: CompressedTensor) -> str | None:
    """Why the handlers cannot run ``x2 [M, K] @ ct`` (None: they can).

    Needs the extension loaded, a codec in `MATMUL_CODECS`, ``ct`` 2-D with channel axis 1
    (logical [K, N], storage [N, K]) and ``x2[..., K]`` in f32 or bf16; int4: groups of
    `ltjax._format.INT4_GROUPS` columns that tile K (what the format holds; a tensor built by hand
    may not).
    """
    if not available():
        return unavailable_reason()
    if ct.codec not in MATMUL_CODECS:
        return f"the CPU handlers multiply {', '.join(MATMUL_CODECS)}, not {ct.codec!r}"
    if ct.ndim != 2 or ct.header.axis != 1:
        return f"the CPU handlers need a 2-D weight stored [N, K] (axis=1); got shape={ct.shape} axis={ct.header.axis}"
    if ct.codec == "int4" and _int4_reason(ct) is not None:
        return _int4_reason(ct)
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
        return f"the CPU handlers unpack {', '.join(UNPACK_CODECS)}, not {ct.codec!r}"
    if ct.codec == "int4":
        return _int4_reason(ct)
    return None


def _int4_reason(ct: CompressedTensor) -> str | None:
    """Why the int4 handlers cannot take ``ct``'s arrays (None: they can): the kernels' group loop
    needs groups of `INT4_GROUPS` columns that tile the storage row."""
    (_, r), g = ct.header.storage_shape, ct.header.group
    if g not in INT4_GROUPS or r % g:
        return f"the CPU handlers take int4 groups of {INT4_GROUPS} columns tiling the row; got group={g}, row={r}"
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
        elif ct.codec == "int4":
            y = int4_matmul(a, ct.codes, ct.scales, ct.mins)
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
        elif ct.codec == "int4":
            y = int4_matmul_t(a, ct.codes, ct.scales, ct.mins)
        else:
            y = bitmask_matmul_t(a, ct.mask, ct.offsets, ct.codes if ct.codec == "bitmask_int8" else ct.values,
                                 ct.scales if ct.codec == "bitmask_int8" else None, k=ct.shape[0], tile=ct.tile)
    return y.reshape(*lead, y.shape[-1])


def unpack(ct: CompressedTensor) -> jax.Array:
    """The dense storage matrix [C, R] of a bitmask / bitmask_int8 / int4 tensor, in its logical dtype
    (bit-exact for ``bitmask``, -0.0 included, and for ``int4`` against the reference decoder)."""
    if ct.codec not in UNPACK_CODECS:
        raise ValueError(f"ltjax.ffi.cpu.unpack handles codecs {UNPACK_CODECS}, got {ct.codec=}")
    with jax.named_scope("ltjax.ffi.cpu.unpack"):
        if ct.codec == "int4":
            return int4_unpack(ct.codes, ct.scales, ct.mins, dtype=ct.dtype)
        if ct.codec == "bitmask":
            return bitmask_unpack(ct.mask, ct.offsets, ct.values, shape=ct.header.storage_shape, dtype=ct.dtype,
                                  tile=ct.tile)
        return bitmask_unpack(ct.mask, ct.offsets, ct.codes, ct.scales, shape=ct.header.storage_shape,
                              dtype=ct.dtype, tile=ct.tile)
