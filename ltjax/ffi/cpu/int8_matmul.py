"""Python twin of int8_matmul.cc: the "ltjax_int8_matmul" / "ltjax_int8_matmul_t" FFI calls."""

from __future__ import annotations

import jax

from ltjax.ffi.cpu._batching import fold_batch


def _fwd_call(x2, codes, scales):
    m, n = x2.shape[0], codes.shape[0]
    out = jax.ShapeDtypeStruct((m, n), x2.dtype)
    return jax.ffi.ffi_call("ltjax_int8_matmul", out, vmap_method="sequential")(x2, codes, scales)


def _t_call(dy2, codes, scales):
    m, k = dy2.shape[0], codes.shape[1]
    out = jax.ShapeDtypeStruct((m, k), dy2.dtype)
    return jax.ffi.ffi_call("ltjax_int8_matmul_t", out, vmap_method="sequential")(dy2, codes, scales)


int8_matmul = fold_batch(_fwd_call)
int8_matmul.__doc__ = "y[M, N] = x2[M, K] @ (codes * scales[:, None]).T; codes [N, K] int8, scales [N] f32."
int8_matmul_t = fold_batch(_t_call)
int8_matmul_t.__doc__ = "dx[M, K] = dy2[M, N] @ (codes * scales[:, None]); the backward for x."
