"""What every test of the ops shares: one tolerance table, one weight maker, one closeness check.

`make_ct` packs fresh random weights (fixed seed per case, never all zero); `rand` draws
activations; `assert_close` compares against a reference relative to the reference's scale,
with the tolerance of the compared array's dtype (`TOLERANCE`) unless told otherwise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ltjax._format import CODECS, INT4_GROUPS, CompressedTensor, group_reason, pack, prepare

# What the batteries run over: every codec, and int4 with a min per group beside its scale.
WEIGHTS = CODECS + ("int4-asymmetric",)

# Relative error allowed, as a fraction of max |reference|, keyed by the dtype of the array
# compared (a result in x's dtype, or a cotangent in its leaf's dtype). One entry serves every
# codec and implementation: each codec decodes exactly into f32 (int8 codes and bf16/f16
# values are exact in f32, the scale is one rounding), so what differs between implementations
# is the order of the f32 sums and where the result is rounded. Measured on the battery's
# shapes (K <= 300, normal x): f32 results within 8e-7, bf16 within 1 ulp, f16 within 7e-4.
TOLERANCE = {
    # f32 sums of K products in another order (blocked, split, tree-reduced, the AMX/VNNI paths'
    # 24-bit fixed-point x): ~sqrt(K) * 2^-24 of max|y| in practice, <= K * 2^-24 at worst
    # (1.8e-5 at K = 300). The fixed-point paths add at most max|x_row| / 2^24 * sum|w| per
    # output (docs/ffi.md), ~1e-6 of max|y| for normal x; their outlier cases are test_ffi's
    # stated-bound tests. A wrong weight moves y by ~1/sqrt(K) of max|y|: far above this.
    "float32": 2e-5,
    # The result rounded to bf16 (8 significand bits): one ulp is at most 2^-7 of max|y| and two
    # f32 sums that straddle a rounding boundary land one ulp apart; 2e-2 is 2.5 such ulps, room
    # for a backward whose bf16 inputs were themselves rounded once on each side.
    "bfloat16": 2e-2,
    # The result rounded to f16 (11 significand bits): one ulp is at most 2^-10 of max|y|;
    # 5e-3 is 5 ulps (Pallas' f16 path rounds its dx operands to f16 too: measured 7e-4).
    "float16": 5e-3,
    # A kernel whose every product is exact in f32 (the CUDA kernels: int8 codes times x, f32 x
    # as its exact bf16 hi/mid/lo parts) differs from the reference by the order of its f32
    # sums alone: measured within 6e-7, held to 2e-6 so a lost low part of x shows.
    ("float32", "exact products"): 2e-6,
}


def tolerance(dtype, kind: str | None = None) -> float:
    """The relative tolerance for an array of ``dtype`` (`TOLERANCE`; ``kind``: a qualified row)."""
    name = jnp.dtype(dtype).name
    return TOLERANCE[name if kind is None else (name, kind)]


def case_seed(*parts) -> int:
    """A fixed seed per case, different between cases (so each case draws its own data)."""
    return zlib.crc32(repr(parts).encode())


def random_weight(shape, *, sparsity: float = 0.6, dtype=np.float32, seed: int | None = None) -> np.ndarray:
    """Standard normal entries, a ``sparsity`` fraction of them exact zeros, cast to ``dtype``.

    Never all zero (an empty weight is a case of its own: build it explicitly).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1): pack np.zeros(...) for an empty weight")
    shape = tuple(shape)
    rng = np.random.default_rng(case_seed(shape, sparsity, str(np.dtype(dtype))) if seed is None else seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0.0
    if not w.any():  # tiny shapes at high sparsity
        w.flat[0] = 1.0
    return w.astype(dtype)


def int4_group(shape, *, tile=None, axis="default") -> int | None:
    """The largest of `INT4_GROUPS` a tensor of ``shape`` cut into ``tile`` takes (None: none)."""
    _, _, storage, tile_rc = prepare(np.ones(shape, np.float32), name="w", axis=axis, tile=tile)
    return next((g for g in sorted(INT4_GROUPS, reverse=True) if group_reason(storage.shape, tile_rc, g) is None), None)


def holds(codec: str, shape, *, tile=None, axis="default") -> bool:
    """Whether ``codec`` (one of `WEIGHTS`) can hold a tensor of this geometry (int4: its scale groups)."""
    return not codec.startswith("int4") or int4_group(shape, tile=tile, axis=axis) is not None


def pack_weight(w: np.ndarray, codec: str, *, tile=None, axis="default") -> CompressedTensor:
    """``w`` packed into ``codec`` (one of `WEIGHTS`): int4 with the largest scale group the
    geometry takes (`int4_group`); ``ValueError`` where none does."""
    if not codec.startswith("int4"):
        return pack(w, codec, tile=tile, axis=axis)
    group = int4_group(w.shape, tile=tile, axis=axis)
    if group is None:
        raise ValueError(f"int4 cannot hold shape={w.shape} tile={tile}: no group of {INT4_GROUPS} divides "
                         "its storage rows and tiles")
    return pack(w, "int4", tile=tile, axis=axis, group=group, asymmetric=codec == "int4-asymmetric")


def make_ct(codec: str, k: int, n: int, *, tile=None, sparsity: float = 0.6, dtype=np.float32,
            seed: int | None = None, axis="default", stack: tuple[int, ...] = ()) -> CompressedTensor:
    """A logical ``[K, N]`` weight (a flax Dense kernel) of fresh random values, packed into ``codec``
    (one of `WEIGHTS`, by `pack_weight`).

    ``sparsity`` (fraction of exact zeros) applies to every codec; ``seed`` defaults to one
    derived from the arguments, so each geometry has its own fixed weight. ``stack``: a stacked
    tensor (`CompressedTensor.stack_shape`, the layers of ``nn.scan``) of that many layers, each
    the weight times its own factor (one zero pattern, so the bitmask layouts stack; ``+ 0.0``
    keeps a negative factor's -0.0, which bitmask stores as a nonzero, out).
    """
    if seed is None:
        seed = case_seed(codec, k, n, tile, sparsity, str(np.dtype(dtype)), axis)
    w = random_weight((k, n), sparsity=sparsity, dtype=np.float32, seed=seed)
    if not stack:
        return pack_weight(w.astype(dtype), codec, tile=tile, axis=axis)
    count = int(np.prod(stack))
    factors = np.random.default_rng(seed + 1).uniform(0.5, 2.0, count) * np.where(np.arange(count) % 2, -1.0, 1.0)
    layers = [pack_weight((w * f + 0.0).astype(dtype), codec, tile=tile, axis=axis) for f in factors]
    flat = jax.tree.map(lambda *a: np.stack(a), *layers)
    return jax.tree.map(lambda a: a.reshape(tuple(stack) + a.shape[1:]), flat)


def rand(shape, dtype=jnp.float32, seed: int | None = None) -> jax.Array:
    """Standard normal activations in ``dtype`` (drawn in f32, then cast), a fixed key per shape and seed."""
    shape = tuple(shape)
    key = jax.random.key(case_seed(shape, jnp.dtype(dtype).name) if seed is None else seed)
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def assert_close(actual, expected, rel: float | None = None) -> None:
    """``max|actual - expected| <= rel * max|expected|``, shapes and dtypes equal.

    ``rel`` defaults to `tolerance` of ``expected``'s dtype. An all-zero ``expected`` allows
    ``rel * 1e-6`` (a sum that cancels exactly on one side may leave f32 noise on the other).
    """
    a, b = np.asarray(actual), np.asarray(expected)
    assert a.shape == b.shape, f"shape {a.shape} != expected {b.shape}"
    assert a.dtype == b.dtype, f"dtype {a.dtype} != expected {b.dtype}"
    rel = tolerance(b.dtype) if rel is None else rel
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(a64 - b64)
    scale = float(np.abs(b64).max(initial=0.0))
    err = float(diff.max(initial=0.0))
    bound = rel * max(scale, 1e-6)
    if not err <= bound:  # also catches NaN
        i = np.unravel_index(np.nanargmax(diff), diff.shape) if diff.size and not np.isnan(diff).all() else ()
        raise AssertionError(
            f"max |actual - expected| = {err:.3g} > {rel:g} * max|expected| ({scale:.3g})"
            + (f"; worst at {tuple(int(j) for j in i)}: {a64[i]!r} vs {b64[i]!r}" if i != () else "")
        )


def rerun_module(path: str, env: dict, select: str, at_least: int) -> None:
    """Runs the tests of module ``path`` (``-k select``) in a fresh process under ``env`` (the CPU
    extension reads its settings once, when it loads): all must pass, none skip, at least
    ``at_least`` of them."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **env, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", str(path), "-k", select]
    r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= at_least and "skipped" not in r.stdout, r.stdout[-2000:]
