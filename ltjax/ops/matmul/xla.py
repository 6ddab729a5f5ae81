"""`ltjax.matmul` in plain XLA over the ``[N, K]`` storage, with no dense weight in the program.

Every decode sits inside a reduction or a loop body indexed by the loop counter, so XLA has no
parameter-only dense array to hoist to the program start. The form depends on M (measured on
CPU, docs/xla.md): at M = 1 a multiply-reduce over ``x`` as 1-D (a ``[1, K]`` broadcast is a
100x cliff), or up to ~4 M weights one fused loop ``x @ f32(codes).T``; up to `VMAP_MAX_M` a
3-D multiply-reduce; above, dots over decoded row chunks. The backward's ``dx`` reduces over
the storage's leading axis: a scan of dots over row chunks, at every M.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ltjax._format import CompressedTensor
from ltjax.ops._common import F32, base_of, decode_rows, has_scales
from ltjax.ops._dispatch import ANYWHERE, Implementation

LOOP_DOT_MAX_ELEMENTS = 2048 * 2048  # M = 1: up to here XLA fuses convert+dot into one loop
VMAP_MAX_M = 16  # largest M for the 3-D fused multiply-reduce; beyond it, chunked dots
FWD_CHUNK_ROWS = 256  # rows of W^T decoded per step of the chunked forward (4 MiB f32 at K=4096)
BWD_CHUNK_ROWS = 128  # rows of W^T decoded per step of the backward dx scan


def why_not(a: jax.Array, ct: CompressedTensor, *, platform: str, interpret: bool) -> str | None:
    if ct.ndim != 2 or ct.header.axis != 1:
        return (f"the XLA path needs a 2-D tensor stored output-channel-major (axis=1, storage [N, K]); "
                f"got shape={ct.shape} axis={ct.header.axis}")
    return None


def _chunks(n: int, rows: int) -> tuple[int, int, int]:
    """(number of full chunks, chunk rows, remainder rows) for n rows."""
    rows = max(1, min(rows, n))
    return n // rows, rows, n % rows


def accumulate(x2: jax.Array, ct: CompressedTensor) -> jax.Array:
    """f32 ``[M, N]``: ``x2 @ W^T`` over the unscaled storage rows (the forward before scaling)."""
    (n, k), m = ct.header.storage_shape, x2.shape[0]
    xf = x2.astype(jnp.float32)
    base = base_of(ct)
    if ct.codec == "int4" and m <= VMAP_MAX_M:
        return _int4_reduce(xf, ct)
    if m == 1:  # x as 1-D: a [1, K] broadcast is the 100x cliff
        w = decode_rows(ct, base, 0, n)
        if n * k <= LOOP_DOT_MAX_ELEMENTS and ct.codec in ("raw", "int8"):
            return jnp.matmul(xf[0], w.T, precision=F32)[None, :]  # one 2-thread loop fusion, no temp
        return jnp.sum(w * xf[0][None, :], axis=-1)[None, :]
    if m <= VMAP_MAX_M:
        return jnp.sum(decode_rows(ct, base, 0, n)[None, :, :] * xf[:, None, :], axis=-1)
    nb, rows, rem = _chunks(n, FWD_CHUNK_ROWS)
    dims = (((1,), (1,)), ((), ()))

    def step(i):
        w = decode_rows(ct, base, i * rows, rows)  # (rows, K)
        return lax.dot_general(xf, w, dims, precision=F32, preferred_element_type=jnp.float32)  # (M, rows)

    out = lax.map(step, jnp.arange(nb, dtype=jnp.int32))  # (nb, M, rows)
    out = jnp.transpose(out, (1, 0, 2)).reshape(m, nb * rows)
    if rem:
        tail = lax.dot_general(xf, decode_rows(ct, base, nb * rows, rem), dims, precision=F32,
                               preferred_element_type=jnp.float32)
        out = jnp.concatenate([out, tail], axis=1)
    return out


def _int4_reduce(xf: jax.Array, ct: CompressedTensor) -> jax.Array:
    """f32 ``[M, N]`` over int4 storage at small M: one multiply-reduce with ``x`` in every term.

    A byte ``c = lo + 16 hi`` meets x's even column ``xe`` and odd column ``xo`` as
    ``lo xe + hi xo = c xe + hi (xo - 16 xe)``, with ``hi = floor(c / 16)`` in f32: float
    arithmetic fuses into the reduction where bitwise ops and an interleave of decoded columns
    would not (XLA then materialises a decoded weight per layer). The codes' offset of 8
    (symmetric) and the mins (asymmetric) multiply per-group sums of x instead.
    """
    h = ct.header
    (n, k), g = h.storage_shape, h.group
    cf = ct.codes.astype(jnp.float32)  # [N, K/2]
    hi = jnp.floor(cf * 0.0625)
    xe, xo = xf[:, 0::2], xf[:, 1::2]  # [M, K/2]
    xg = jnp.sum((xe + xo).reshape(-1, k // g, g // 2), axis=-1)  # [M, K/G]: x summed per group
    if xf.shape[0] == 1:  # 1-D x: a [1, K] broadcast is the 100x cliff
        t = cf * xe[0] + hi * (xo[0] - 16.0 * xe[0])  # [N, K/2]
        part = jnp.sum(t.reshape(n, k // g, g // 2), axis=-1)[None]  # [1, N, K/G]
    else:
        t = cf[None] * xe[:, None, :] + hi[None] * (xo - 16.0 * xe)[:, None, :]  # [M, N, K/2]
        part = jnp.sum(t.reshape(xf.shape[0], n, k // g, g // 2), axis=-1)
    if h.asymmetric:  # x = q s + m
        return jnp.sum(part * ct.scales.astype(jnp.float32)[None] + ct.mins.astype(jnp.float32)[None] * xg[:, None],
                       axis=-1)
    return jnp.sum((part - 8.0 * xg[:, None]) * ct.scales.astype(jnp.float32)[None], axis=-1)  # x = (q - 8) s


def run(x2: jax.Array, ct: CompressedTensor, *, interpret: bool):
    """(y in x's dtype, the unscaled f32 accumulator, which the scale gradient reuses)."""
    acc = accumulate(x2, ct)
    y = acc * ct.scales[None, :] if has_scales(ct) else acc
    return y.astype(x2.dtype), acc


def run_t(dy2: jax.Array, ct: CompressedTensor, *, interpret: bool) -> jax.Array:
    """f32 ``[M, K]``: ``dy2 @ W^T`` for logical ``W [K, N]`` (so ``dy2 @ storage``), chunked over N."""
    (n, k), m = ct.header.storage_shape, dy2.shape[0]
    g = dy2.astype(jnp.float32)
    if has_scales(ct):
        g = g * ct.scales[None, :]
    base = base_of(ct)
    nb, rows, rem = _chunks(n, BWD_CHUNK_ROWS)

    def step(acc, i):
        w = decode_rows(ct, base, i * rows, rows)  # (rows, K)
        gi = lax.dynamic_slice_in_dim(g, i * rows, rows, 1)  # (M, rows)
        return acc + jnp.dot(gi, w, precision=F32, preferred_element_type=jnp.float32), None

    acc = jnp.zeros((m, k), jnp.float32)
    if nb:
        acc, _ = lax.scan(step, acc, jnp.arange(nb, dtype=jnp.int32))
    if rem:
        acc = acc + jnp.dot(g[:, nb * rows:], decode_rows(ct, base, nb * rows, rem), precision=F32,
                            preferred_element_type=jnp.float32)
    return acc


IMPL = Implementation("xla", ANYWHERE, False, why_not, run)
IMPL_T = Implementation("xla", ANYWHERE, False, why_not, run_t)
