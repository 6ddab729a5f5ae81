"""CPU fast path: fused int8 / bitmask matmuls and bitmask unpack as XLA FFI custom calls.

The handlers (C++, AVX-512 VBMI2 or AVX2 chosen at run time, a small thread pool over output
channels) are built by the package install into ``ltjax/ffi/_ltjax_ffi*.so`` and registered
for platform "cpu" when this module is imported. Where they are missing, `available()` is
False, `unavailable_reason()` says why, and `can_use_ffi` sends callers to the XLA path
(logged once). See docs/ffi.md.

Weights follow the LT-Block storage layout: a logical [K, N] kernel (channel axis 1) is the
storage matrix W [N, K], one scale per output channel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ltjax._format import CompressedTensor, decode_storage
from ltjax.ffi._registry import available, info, log_unavailable_once, unavailable_reason
from ltjax.ffi.bitmask_matmul import bitmask_matmul, bitmask_matmul_t
from ltjax.ffi.bitmask_unpack import bitmask_unpack
from ltjax.ffi.int8_matmul import int8_matmul, int8_matmul_t

__all__ = [
    "available",
    "can_use_ffi",
    "can_use_unpack",
    "info",
    "matmul",
    "matmul_t",
    "matmul_vjp",
    "unavailable_reason",
    "unpack_bitmask",
]

MATMUL_CODECS = ("int8", "bitmask_int8", "bitmask")
X_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def can_use_ffi(x, ct: CompressedTensor) -> bool:
    """Whether `matmul(x, ct)` can run on the CPU handlers.

    Needs: the cpu backend, the extension loaded, codec int8 / bitmask_int8 / bitmask, ``ct``
    2-D with channel axis 1 (logical [K, N], storage [N, K]), ``x[..., K]`` in f32 or bf16.
    ``raw`` weights are left to XLA's own dot.
    """
    if not _on_cpu():
        return False
    if not available():
        log_unavailable_once()
        return False
    return (
        ct.codec in MATMUL_CODECS
        and ct.ndim == 2
        and ct.header.axis == 1
        and np.dtype(x.dtype) in X_DTYPES
        and x.ndim >= 1
        and x.shape[-1] == ct.shape[0]
    )


def can_use_unpack(ct: CompressedTensor) -> bool:
    """Whether `unpack_bitmask(ct)` can run on the CPU handlers (bitmask codecs, any shape)."""
    if not _on_cpu():
        return False
    if not available():
        log_unavailable_once()
        return False
    return ct.codec in ("bitmask", "bitmask_int8")


def _check(ct: CompressedTensor, codecs) -> None:
    if ct.codec not in codecs:
        raise ValueError(f"ltjax.ffi handles codecs {codecs}, got {ct.codec=}")
    if ct.ndim != 2 or ct.header.axis != 1:
        raise ValueError(f"ltjax.ffi needs a 2-D weight with channel axis 1, got shape={ct.shape} axis={ct.header.axis}")


def matmul(x2: jax.Array, ct: CompressedTensor) -> jax.Array:
    """``x2[..., K] @ W[K, N]`` in x's dtype (f32 accumulation); ``ct`` logical [K, N], storage [N, K].

    Not differentiable by itself (the op layer's custom VJP calls `matmul_t` for dx);
    `matmul_vjp` is a differentiable version.
    """
    _check(ct, MATMUL_CODECS)
    lead = x2.shape[:-1]
    a = x2.reshape(-1, x2.shape[-1])
    with jax.named_scope("ltjax.ffi.matmul"):
        if ct.codec == "int8":
            y = int8_matmul(a, ct.codes, ct.scales)
        else:
            y = bitmask_matmul(a, ct.mask, ct.offsets, ct.codes if ct.codec == "bitmask_int8" else ct.values,
                               ct.scales if ct.codec == "bitmask_int8" else None, tile=ct.tile)
    return y.reshape(*lead, y.shape[-1])


def matmul_t(dy2: jax.Array, ct: CompressedTensor) -> jax.Array:
    """``dy2[..., N] @ W[K, N].T`` → ``[..., K]`` in dy's dtype: the backward of `matmul` for x."""
    _check(ct, MATMUL_CODECS)
    lead = dy2.shape[:-1]
    a = dy2.reshape(-1, dy2.shape[-1])
    with jax.named_scope("ltjax.ffi.matmul_t"):
        if ct.codec == "int8":
            y = int8_matmul_t(a, ct.codes, ct.scales)
        else:
            y = bitmask_matmul_t(a, ct.mask, ct.offsets, ct.codes if ct.codec == "bitmask_int8" else ct.values,
                                 ct.scales if ct.codec == "bitmask_int8" else None, k=ct.shape[0], tile=ct.tile)
    return y.reshape(*lead, y.shape[-1])


def unpack_bitmask(ct: CompressedTensor) -> jax.Array:
    """The dense storage matrix [C, R] of a bitmask / bitmask_int8 tensor, in its logical dtype."""
    _check_unpack = ("bitmask", "bitmask_int8")
    if ct.codec not in _check_unpack:
        raise ValueError(f"unpack_bitmask handles codecs {_check_unpack}, got {ct.codec=}")
    with jax.named_scope("ltjax.ffi.unpack_bitmask"):
        if ct.codec == "bitmask":
            return bitmask_unpack(ct.mask, ct.offsets, ct.values, shape=ct.header.storage_shape, dtype=ct.dtype,
                                  tile=ct.tile)
        return bitmask_unpack(ct.mask, ct.offsets, ct.codes, ct.scales, shape=ct.header.storage_shape,
                              dtype=ct.dtype, tile=ct.tile)


# ---------------------------------------------------------------------- differentiable glue
# The public `ltjax.matmul` owns its VJP; this one exists for tests and for callers of ltjax.ffi.
@jax.custom_vjp
def matmul_vjp(x2: jax.Array, ct: CompressedTensor) -> jax.Array:
    """`matmul` with a VJP: dx by the fused `matmul_t`; float leaves of ``ct`` through the reference."""
    return matmul(x2, ct)


def _vjp_fwd(x2, ct):
    return matmul(x2, ct), (x2, ct)


def _vjp_bwd(res, dy):
    x2, ct = res
    dx = matmul_t(dy, ct).astype(x2.dtype)
    # Weight cotangent: storage dS[N, K] = dy^T x, pulled back to the float leaves by the reference
    # decoder; integer leaves (codes, mask, offsets, checksums, row_starts) get float0 zeros.
    a = x2.reshape(-1, x2.shape[-1]).astype(jnp.float32)
    g = dy.reshape(-1, dy.shape[-1]).astype(jnp.float32)
    ds = g.T @ a
    floats = {k: v for k, v in ct.arrays().items() if jnp.issubdtype(v.dtype, jnp.floating)}

    def decode(fl):
        return decode_storage(type(ct)(header=ct.header, **{**ct.arrays(), **fl}), jnp.float32)

    _, pull = jax.vjp(decode, floats)
    (dfl,) = pull(ds)
    cot = {
        k: dfl[k].astype(v.dtype) if k in dfl else np.zeros(v.shape, jax.dtypes.float0)
        for k, v in ct.leaves().items()
    }
    return dx, type(ct)(header=ct.header, **cot)


matmul_vjp.defvjp(_vjp_fwd, _vjp_bwd)
