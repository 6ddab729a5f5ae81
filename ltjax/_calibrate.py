"""Calibrated int4: GPTQ error feedback from a layer's input statistics (docs/int4.md, "Calibration").

Round to nearest quantizes each weight alone, but what matters is the layer's output error
``X (W - Q)^T``, which the inputs' correlations ``H = 2 X^T X / n`` weigh. GPTQ (Frantar et al.,
2022) quantizes the reduction axis K one column at a time and moves each column's rounding error
into the columns not yet quantized, along the row of the upper Cholesky factor of ``H^-1`` (the
exact minimiser of the quadratic output loss for the remaining columns), so errors the inputs
would see cancel. The result is plain int4: `int4_quantize`'s group rules (Q4_0 / Q4_1 scales
and mins, fitted on the group's columns as error feedback has left them when the group is
reached, or up front under act-order), so every decoder reads it unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from typing import Any

import numpy as np
import scipy.linalg

from ltjax._format import INT4_GROUPS, int4_quantize

log = logging.getLogger("ltjax")

MIN_TOKENS = 64  # fewer rows than this say too little about a layer's inputs to fit anything on
DAMP = 0.01  # GPTQ's dampening: this fraction of the mean of diag(H) added to the diagonal
BLOCK = 128  # lazy batch updates: columns whose error feedback is applied to the rest at once


@dataclasses.dataclass(frozen=True, eq=False)
class InputStats:
    """The second moment of one layer's matmul inputs ``X [tokens, K]`` (its ``[M, K]`` view).

    ``xtx = X^T X`` summed over ``count`` rows, float64 ``[K, K]`` (a stack of layers, e.g.
    ``nn.scan``'s: ``[L, K, K]``). Memory is K x K per layer however many tokens were seen; the
    GPTQ Hessian is ``2 xtx / count``.
    """

    xtx: np.ndarray
    count: int

    @property
    def k(self) -> int:
        return int(self.xtx.shape[-1])

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.xtx.shape[:-2])

    def layer(self, i: int) -> InputStats:
        return InputStats(self.xtx[i], self.count)

    @classmethod
    def from_inputs(cls, x: Any, *, name: str = "calibration") -> InputStats:
        """Statistics of the inputs ``x [tokens, K]`` (numpy or jax; f32/bf16/f16/f64)."""
        a = np.asarray(x)
        if a.ndim != 2:
            raise ValueError(f"{name}: the layer's inputs must be [tokens, K], got shape={a.shape}")
        if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":
            raise ValueError(f"{name}: the layer's inputs must be floating point, got dtype={a.dtype}")
        a = a.astype(np.float64)
        bad = ~np.isfinite(a)
        if bad.any():
            raise ValueError(f"{name}: the inputs hold {int(bad.sum())} non-finite values (NaN/Inf); "
                             "calibration needs finite activations")
        return cls(a.T @ a, int(a.shape[0]))

    def __add__(self, other: InputStats) -> InputStats:
        if self.xtx.shape != other.xtx.shape:
            raise ValueError(f"cannot add input statistics of shapes {self.xtx.shape} and {other.xtx.shape}")
        return InputStats(self.xtx + other.xtx, self.count + other.count)


def as_stats(calibration: Any, *, name: str) -> InputStats:
    """``calibration`` (an `InputStats`, or the inputs ``[tokens, K]``) as checked `InputStats`."""
    stats = calibration if isinstance(calibration, InputStats) else InputStats.from_inputs(calibration, name=name)
    if stats.count < MIN_TOKENS:
        raise ValueError(f"{name}: calibration holds {stats.count} tokens; GPTQ needs at least {MIN_TOKENS} "
                         "(a few hundred or more: H = X^T X is K x K)")
    if not np.all(np.isfinite(stats.xtx)):
        raise ValueError(f"{name}: calibration statistics hold non-finite values (NaN/Inf)")
    return stats


def check_k(stats: InputStats, k: int, *, name: str) -> None:
    if stats.k != k:
        raise ValueError(f"{name}: calibration inputs have K={stats.k} features, but the weight's reduction axis "
                         f"(the storage row: K of a Dense kernel [K, N]) has {k}")


def hessian(stats: InputStats) -> np.ndarray:
    return 2.0 * stats.xtx / stats.count


def output_error(w2: np.ndarray, dec2: np.ndarray, stats: InputStats | None) -> float:
    """Squared relative error: ``||X (W - Q)^T||^2 / ||X W^T||^2`` over the storage rows
    ``[C, K]`` with statistics, else ``||W - Q||^2 / ||W||^2``."""
    w = w2.astype(np.float64)
    d = dec2.astype(np.float64) - w
    if stats is None:
        num, den = float(np.sum(d * d)), float(np.sum(w * w))
    else:  # float32 products (the error is a relative figure), summed in float64
        h = stats.xtx.astype(np.float32)
        d32, w32 = d.astype(np.float32), w.astype(np.float32)
        num = float(np.sum((d32 @ h) * d32, dtype=np.float64))
        den = float(np.sum((w32 @ h) * w32, dtype=np.float64))
    if den <= 0.0:
        return 0.0 if num <= 0.0 else math.inf
    return max(num, 0.0) / den


_INVERSE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inverse_cholesky(stats: InputStats, damp: float, act_order: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(perm, U)``: the column order and the upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``
    over it (float32), raising the damping until it exists; cached per statistics (every group and
    symmetry of one layer shares it)."""
    key = (float(damp), bool(act_order))
    cached = _INVERSE_CACHE.setdefault(stats, {})
    if key not in cached:
        h = hessian(stats)
        dead = np.diag(h) == 0  # inputs never seen: no feedback to or from them (H stays diagonal there)
        if dead.any():
            h = h.copy()
            h[dead, dead] = 1.0
        k = h.shape[0]
        perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
        h = h[np.ix_(perm, perm)]
        mean = float(np.mean(np.diag(h))) or 1.0
        rev = np.arange(k)[::-1]
        for attempt in range(8):
            d = damp * 10.0**attempt
            try:
                # H = R R^T with R upper (a reversed Cholesky) gives H^-1 = R^-T R^-1: U = R^-1, upper.
                low = scipy.linalg.cholesky((h + d * mean * np.eye(k))[np.ix_(rev, rev)], lower=True)
                r = low[np.ix_(rev, rev)]
                u = scipy.linalg.solve_triangular(r, np.eye(k), lower=False)
                break
            except np.linalg.LinAlgError:
                continue
        else:
            raise ValueError(f"calibration statistics are not positive definite even with damping {d:g}")
        cached[key] = (perm, u.astype(np.float32))
    return cached[key]


def _params(x2: np.ndarray, group: int, asymmetric: bool):
    """Per-group (scale f32, min f32 or None, 1/scale f32) of ``x2 [C, n*group]`` by `int4_quantize`'s rules."""
    _, s16, m16 = int4_quantize(x2, group, asymmetric)
    s = s16.astype(np.float32)
    inv = np.where(s != 0, 1.0 / np.where(s != 0, s, 1.0), 0.0).astype(np.float32)
    return s16, m16, s, (None if m16 is None else m16.astype(np.float32)), inv


def gptq_int4(
    w2: np.ndarray,
    calibration: Any,
    group: int,
    asymmetric: bool,
    *,
    damp: float = DAMP,
    act_order: bool = False,
    block: int = BLOCK,
    name: str = "tensor",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ int4 of the storage matrix ``w2 [C, K]`` (a Dense kernel ``[K, N]`` stored as ``[N, K]``).

    Returns ``(codes uint8 [C, K/2], scales float16 [C, K/G], mins float16 [C, K/G] or None)`` in
    `int4_quantize`'s layout, for `ltjax._format.pack(..., int4=...)`.

    ``calibration``: `InputStats` or the layer's inputs ``[tokens, K]``. Columns go in order
    (with ``act_order``: by decreasing ``diag(H)``, the inputs' energy), each group's scale (and
    min) fitted by the format's rule on its columns as error feedback has left them when the
    group's first column is reached; with ``act_order`` a group's columns are not contiguous in
    the quantization order, so the scales are fitted up front on the original weights (static
    groups). ``block`` columns are quantized against each other, then their errors update the
    remaining columns in one matrix product (GPTQ's lazy batch updates).
    """
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group={group} is not one of {INT4_GROUPS}")
    c, k = w2.shape
    if k % group:
        raise ValueError(f"tensor {name!r}: int4 needs the reduction axis (storage row of {k} columns) to be a "
                         f"multiple of group={group}")
    stats = as_stats(calibration, name=name)
    check_k(stats, k, name=name)
    block = max(group, block // group * group)
    perm, u = inverse_cholesky(stats, damp, act_order)
    w = w2.astype(np.float32).copy()
    ngroups = k // group
    scales16 = np.zeros((c, ngroups), np.float16)
    mins16 = np.zeros((c, ngroups), np.float16) if asymmetric else None
    s = np.zeros((c, ngroups), np.float32)
    m = np.zeros((c, ngroups), np.float32) if asymmetric else None
    inv = np.zeros((c, ngroups), np.float32)

    def fit(g: slice, cols: np.ndarray) -> None:
        s16, m16, s[:, g], mg, inv[:, g] = _params(cols, group, asymmetric)
        scales16[:, g] = s16
        if asymmetric:
            mins16[:, g], m[:, g] = m16, mg

    if act_order:
        fit(slice(None), w)
    w = w[:, perm]
    q = np.zeros((c, k), np.uint8)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].copy()
        err = np.zeros((c, i2 - i1), np.float32)
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = int(perm[i1 + j])
            g = col // group
            if not act_order and col % group == 0:
                fit(slice(g, g + 1), w1[:, j : j + group])  # the group lies inside this block (block % group == 0)
            x = w1[:, j]
            if asymmetric:
                code = np.clip(np.rint((x - m[:, g]) * inv[:, g]), 0, 15)
                deq = code * s[:, g] + m[:, g]
            else:
                code = np.clip(np.rint(x * inv[:, g]) + 8, 0, 15)
                deq = (code - 8) * s[:, g]
            q[:, col] = code.astype(np.uint8)
            e = (x - deq) / u1[j, j]
            w1[:, j + 1 :] -= np.outer(e, u1[j, j + 1 :])
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    codes = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return codes, scales16, mins16
