"""`ltjax.ops.residual`: the bit packing of training residuals, one battery over its implementations.

``pack_mask`` / ``unpack_mask`` and ``pack_sparse`` / ``unpack_sparse`` bit-exact against the
references (and the mask words against numpy bit arithmetic), round trips, capacity overflow,
-0.0 and NaN kept as nonzeros, under jit. The public functions (``impl`` None here: the
platform picks, the reference off a GPU) take no ``impl=``; the others run through their
registry entry (`Implementation.run`), the Pallas kernels in interpret mode off a GPU. The
layers that save residuals with them (ltjax.nn.relu, sparse_dense) are tested in
test_activations.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import case_seed

import ltjax._config
from ltjax.ops import residual
from ltjax.ops.residual import IMPLEMENTATIONS

# None: the public functions. Off a GPU they run the reference, so its registry entry is not
# run again there.
_EMULATED = ltjax._config.host_platform() not in ("cuda", "rocm")
IMPLS = tuple(i.name for i in IMPLEMENTATIONS if not (_EMULATED and i.name == "reference")) + (None,)
_BY_NAME = {i.name: i for i in IMPLEMENTATIONS}


def call(impl: str | None, elements: tuple[int, object], name: str, *args, **static):
    """``name(*args, **static)`` on ``impl`` under jit, emulated off its platforms; skips with the
    registry's reason where it cannot run ``elements`` (n, dtype: what the registry is asked)."""
    n, dtype = elements
    if impl is None:
        return jax.jit(functools.partial(getattr(residual, name), **static))(*args)
    entry = _BY_NAME[impl]
    host = ltjax._config.host_platform()
    interpret = entry.emulated and entry.platforms is not None and host not in entry.platforms
    why = entry.reason(n, dtype, platform=host, interpret=interpret)
    if why is not None:
        pytest.skip(f"{impl}: {why}")
    return jax.jit(functools.partial(entry.run, name, interpret=interpret, **static))(*args)


def _ids(v):
    return "public" if v is None else str(v)


def assert_bits_equal(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    assert got.tobytes() == want.tobytes(), (got, want)


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000])
@pytest.mark.parametrize("impl", IMPLS, ids=_ids)
def test_mask_round_trip(impl, n):
    mask = jax.random.bernoulli(jax.random.key(case_seed("mask", n)), 0.4, (n,))
    words = call(impl, (n, jnp.float32), "pack_mask", mask)
    assert words.dtype == jnp.uint32 and words.shape == (residual.num_words(n),)
    assert_bits_equal(words, residual.pack_mask_reference(mask))
    padded = np.zeros(residual.num_words(n) * 32, np.uint64)  # an independent packing: numpy bit arithmetic
    padded[:n] = np.asarray(mask)
    want = (padded.reshape(-1, 32) << np.arange(32, dtype=np.uint64)).sum(-1)
    np.testing.assert_array_equal(np.asarray(words, np.uint64), want)
    back = call(impl, (n, jnp.float32), "unpack_mask", words, n=n)
    assert_bits_equal(back, mask)


def test_mask_any_shape_is_flattened_in_c_order():
    mask = jax.random.bernoulli(jax.random.key(5), 0.5, (3, 4, 11))
    assert_bits_equal(residual.pack_mask(mask), residual.pack_mask_reference(mask.reshape(-1)))


# ------------------------------------------------------------------ sparse tensors
def _with_signed_zeros_and_nan(shape, dtype):
    """Half exact +0.0, one -0.0 and one NaN (both nonzero bit patterns), never all zero."""
    k1, k2 = jax.random.split(jax.random.key(case_seed(shape, jnp.dtype(dtype).name)))
    x = jax.random.normal(k1, shape)
    x = jnp.where(jax.random.uniform(k2, shape) < 0.5, 0.0, x).reshape(-1)
    x = x.at[1].set(-0.0).at[-1].set(jnp.nan)
    return x.reshape(shape).astype(dtype)


def _sparse_cases():
    """Every (shape, dtype) for the public functions (and the reference on a GPU); two for Pallas
    in interpret mode."""
    cases = [(shape, dtype) for shape in [(7,), (5, 13), (3, 4, 33)] for dtype in (jnp.float32, jnp.bfloat16)]
    interpreted = [((7,), jnp.float32), ((3, 4, 33), jnp.bfloat16)]
    return [pytest.param(impl, shape, dtype, id=f"{_ids(impl)}-{shape}-{jnp.dtype(dtype).name}")
            for impl in IMPLS for shape, dtype in cases
            if not (impl == "pallas" and _EMULATED and (shape, dtype) not in interpreted)]


@pytest.mark.parametrize("impl,shape,dtype", _sparse_cases())
def test_sparse_round_trip(impl, shape, dtype):
    x = _with_signed_zeros_and_nan(shape, dtype)
    n = x.size
    nnz = int(np.count_nonzero(np.asarray(x).view(f"u{x.dtype.itemsize}")))
    for capacity in (n, max(1, nnz // 3)):  # fits, overflows
        got = call(impl, (n, dtype), "pack_sparse", x, capacity=capacity)
        want = jax.jit(residual.pack_sparse_reference, static_argnums=1)(x, capacity)
        for g, w in zip(got, want):
            assert_bits_equal(g, w)
        assert int(got[2]) == nnz and got[1].shape == (capacity,)
        dense = call(impl, (n, dtype), "unpack_sparse", got[0], got[1], shape=shape, dtype=dtype)
        unpack = jax.jit(residual.unpack_sparse_reference, static_argnums=(2, 3))
        assert_bits_equal(dense, unpack(want[0], want[1], shape, dtype))
        if capacity >= nnz:
            assert_bits_equal(dense, x)  # -0.0 and NaN included
        else:  # overflowed nonzeros read as zero, never as another value
            xs, ds = np.asarray(x, np.float32).reshape(-1), np.asarray(dense, np.float32).reshape(-1)
            kept = ds != 0
            np.testing.assert_array_equal(ds[kept], xs[kept])


def test_pallas_refuses_with_a_reason():
    entry = _BY_NAME["pallas"]
    assert "16- or 32-bit float" in entry.reason(64, jnp.float64, platform="cuda")
    assert "int32 positions" in entry.reason(2**31, jnp.float32, platform="cuda")
    assert entry.reason(64, jnp.float32, platform="cpu") == "runs on cuda/rocm; the platform is 'cpu'"
    assert entry.reason(64, jnp.bfloat16, platform="cpu", interpret=True) is None
