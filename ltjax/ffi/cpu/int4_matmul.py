"""Python twin of int4_matmul.cc: the "ltjax_int4_matmul" / "ltjax_int4_matmul_t" FFI calls and
their asymmetric variants ("ltjax_int4_asym_matmul" / "_t", with the mins)."""

from __future__ import annotations

import jax

from ltjax.ffi.cpu._batching import fold_batch


def _fwd_call(x2, codes, scales, *mins):
    m, n = x2.shape[0], codes.shape[0]
    out = jax.ShapeDtypeStruct((m, n), x2.dtype)
    f = jax.ffi.ffi_call("ltjax_int4_asym_matmul" if mins else "ltjax_int4_matmul", out, vmap_method="sequential")
    return f(x2, codes, scales, *mins)


def _t_call(dy2, codes, scales, *mins):
    m, k = dy2.shape[0], 2 * codes.shape[1]
    out = jax.ShapeDtypeStruct((m, k), dy2.dtype)
    f = jax.ffi.ffi_call("ltjax_int4_asym_matmul_t" if mins else "ltjax_int4_matmul_t", out, vmap_method="sequential")
    return f(dy2, codes, scales, *mins)


_fwd = fold_batch(_fwd_call)
_t = fold_batch(_t_call)


def int4_matmul(x2, codes, scales, mins=None):
    """y[M, N] = x2[M, K] @ W.T; W [N, K] = (q - 8) * s, or q * s + m with ``mins``; codes [N, K/2]
    uint8 (column 2j in the low nibble), scales and mins [N, K/G] float16."""
    return _fwd(x2, codes, scales, *(() if mins is None else (mins,)))


def int4_matmul_t(dy2, codes, scales, mins=None):
    """dx[M, K] = dy2[M, N] @ W; the backward for x."""
    return _t(dy2, codes, scales, *(() if mins is None else (mins,)))
