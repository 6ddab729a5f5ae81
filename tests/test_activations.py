"""Tests for compressed activation residuals (ltjax._activations and its modules)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn, nnx

from ltjax import _activations as A
from ltjax._activation_modules import CompressedReLU, NnxCompressedReLU, SparseDense, SparseLinear
from ltjax.ops import residual


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _assert_tree_bits_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert _bits_equal(x, y), (x, y)


def _with_exact_zeros(key, shape, frac=0.3):
    """Random normals with a fraction of exact +0.0, a -0.0, never all zero."""
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, shape)
    x = jnp.where(jax.random.uniform(k2, shape) < frac, 0.0, x)
    return x.reshape(-1).at[1].set(-0.0).reshape(shape)


def _sparse_input(key, shape, sparsity):
    """A post-ReLU-like input with the given fraction of exact zeros."""
    k1, k2 = jax.random.split(key)
    x = jnp.abs(jax.random.normal(k1, shape)) + 0.1
    return jnp.where(jax.random.uniform(k2, shape) < sparsity, 0.0, x)


# ------------------------------------------------------------------ packing
# pack/unpack of masks and sparse tensors (reference and Pallas, bit-exact): tests/ops/test_residual.py.


# ------------------------------------------------------------------ relu


def test_relu_forward_is_exact():
    x = _with_exact_zeros(jax.random.key(2), (9, 17)).at[0, 0].set(jnp.nan)
    assert _bits_equal(A.relu(x), jax.nn.relu(x))
    xb = x.astype(jnp.bfloat16)
    assert _bits_equal(A.relu(xb), jax.nn.relu(xb))


def _mlp(act, params, x):
    h = x
    for w, b in params[:-1]:
        h = act(h @ w + b)
    w, b = params[-1]
    return jnp.mean((h @ w + b) ** 2)


def _mlp_params(key, sizes):
    keys = jax.random.split(key, len(sizes))
    return [(jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros((b,)))
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def test_relu_grad_bit_identical_with_exact_zeros():
    params = _mlp_params(jax.random.key(3), [12, 40, 40, 3])
    x = _with_exact_zeros(jax.random.key(4), (16, 12), frac=0.5)
    # A first relu applied to x itself sees exact zeros (grad 0 there, as jax.nn.relu).
    f = lambda act: (lambda p, x: _mlp(act, p, act(x)))
    g_ref = jax.grad(f(jax.nn.relu), argnums=(0, 1))(params, x)
    g = jax.grad(f(A.relu), argnums=(0, 1))(params, x)
    _assert_tree_bits_equal(g, g_ref)
    g_jit = jax.jit(jax.grad(f(A.relu), argnums=(0, 1)))(params, x)
    g_ref_jit = jax.jit(jax.grad(f(jax.nn.relu), argnums=(0, 1)))(params, x)
    _assert_tree_bits_equal(g_jit, g_ref_jit)


def test_relu_vmap_checkpoint_scan():
    w = jax.random.normal(jax.random.key(5), (8, 8))
    xs = _with_exact_zeros(jax.random.key(6), (4, 5, 8))

    def make(act, wrap):
        def body(h, _):
            return wrap(lambda h: act(h @ w))(h), None

        def loss(x):
            h, _ = jax.lax.scan(body, x, None, length=3)
            return jnp.sum(jnp.tanh(h))
        return jax.jit(jax.vmap(jax.grad(loss)))

    for wrap in (lambda f: f, jax.checkpoint):
        assert _bits_equal(make(A.relu, wrap)(xs), make(jax.nn.relu, wrap)(xs))


def test_relu_residual_is_one_bit_per_element():
    x = jax.random.normal(jax.random.key(7), (64, 100))
    _, vjp = jax.vjp(A.relu, x)
    res = [l for l in jax.tree.leaves(vjp) if hasattr(l, "dtype")]
    assert sum(l.nbytes for l in res) == residual.num_words(x.size) * 4
    assert all(l.dtype == jnp.uint32 for l in res)


# ------------------------------------------------------------------ flax modules


class _LinenBlock(nn.Module):
    act: type

    @nn.compact
    def __call__(self, h, _):
        return self.act()(nn.Dense(16)(h)), None


class _Relu(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(x)


def _linen_stack(act):
    block = nn.remat(_LinenBlock)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(act)


def test_linen_scan_remat_compressed_relu():
    x = _with_exact_zeros(jax.random.key(8), (6, 16))
    ref, ours = _linen_stack(_Relu), _linen_stack(CompressedReLU)
    params = ref.init(jax.random.key(9), x, None)
    loss = lambda m: (lambda p: jnp.sum(jnp.sin(m.apply(p, x, None)[0])))
    _assert_tree_bits_equal(jax.jit(jax.grad(loss(ours)))(params),
                            jax.jit(jax.grad(loss(ref)))(params))


def test_nnx_compressed_relu_and_sparse_linear():
    x = _sparse_input(jax.random.key(10), (8, 12), 0.6)
    layer = SparseLinear(12, 5, capacity=0.6, rngs=nnx.Rngs(0))
    act = NnxCompressedReLU()
    assert not jax.tree.leaves(nnx.state(act))
    loss = lambda l, x: jnp.sum(jnp.tanh(act(l(x))))
    g = nnx.jit(nnx.grad(loss))(layer, x)
    ref_loss = lambda kb, x: jnp.sum(jnp.tanh(jax.nn.relu(A.dense_reference(x, *kb))))
    gk, gb = jax.jit(jax.grad(ref_loss))((layer.kernel[...], layer.bias[...]), x)
    assert _bits_equal(g["kernel"][...], gk) and _bits_equal(g["bias"][...], gb)


def test_linen_sparse_dense_matches_dense():
    x = _sparse_input(jax.random.key(11), (8, 12), 0.7)
    ours, ref = SparseDense(6, capacity=0.5), nn.Dense(6)
    params = ref.init(jax.random.key(12), x)
    loss = lambda m: (lambda p, x: jnp.sum(jnp.tanh(m.apply(p, x))))
    assert _bits_equal(ours.apply(params, x), ref.apply(params, x))
    _assert_tree_bits_equal(jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x),
                            jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x))


# ------------------------------------------------------------------ sparse_dense


def _dense_loss(op, **kw):
    return lambda x, w, b: jnp.sum(jnp.tanh(op(x, w, b, **kw)) * jnp.arange(w.shape[1]))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_sparse_dense_grads_bit_identical(sparsity):
    x = _sparse_input(jax.random.key(13), (32, 24), sparsity)
    w = jax.random.normal(jax.random.key(14), (24, 10))
    b = jax.random.normal(jax.random.key(15), (10,))
    cap = 1.0 if sparsity == 0.0 else max(0.05, 1.0 - sparsity + 0.1)
    ours = jax.jit(jax.grad(_dense_loss(A.sparse_dense, capacity=cap), argnums=(0, 1, 2)))
    ref = jax.jit(jax.grad(_dense_loss(A.dense_reference), argnums=(0, 1, 2)))
    _assert_tree_bits_equal(ours(x, w, b), ref(x, w, b))
    # independent reference for dW: numpy float64 x^T dy
    dy = np.asarray(jax.grad(lambda y: jnp.sum(jnp.tanh(y) * jnp.arange(10)))(
        A.dense_reference(x, w, b)), np.float64)
    np.testing.assert_allclose(ours(x, w, b)[1], np.asarray(x, np.float64).T @ dy,
                               rtol=1e-5, atol=1e-5)


def test_sparse_dense_overflow_is_reported_and_never_wrong():
    x = _sparse_input(jax.random.key(16), (32, 24), 0.3)  # density 0.7 > capacity
    w = jax.random.normal(jax.random.key(17), (24, 10))
    b = jnp.zeros((10,))
    A.reset_overflow_events()
    g = jax.jit(jax.grad(_dense_loss(A.sparse_dense, capacity=0.25), argnums=1))(x, w, b)
    jax.effects_barrier()
    assert A.overflow_events() == 1
    assert bool(jnp.all(jnp.isnan(g)))  # poisoned, never a finite wrong value

    step = A.value_and_grad_exact(_dense_loss(A.sparse_dense, capacity=0.25),
                                  argnums=(0, 1, 2))
    ref = jax.jit(jax.value_and_grad(_dense_loss(A.dense_reference), argnums=(0, 1, 2)))
    _assert_tree_bits_equal(step(x, w, b), ref(x, w, b))
    assert step.fallbacks == 1
    xs = _sparse_input(jax.random.key(18), (32, 24), 0.9)  # fits: no fallback
    _assert_tree_bits_equal(step(xs, w, b), ref(xs, w, b))
    assert step.fallbacks == 1


def test_sparse_dense_vmap_checkpoint_scan():
    xs = _sparse_input(jax.random.key(19), (3, 4, 16), 0.6)
    w = jax.random.normal(jax.random.key(20), (16, 16)) / 4

    def make(op, wrap):
        def loss(x, w):
            def body(h, _):
                return wrap(lambda h: jax.nn.relu(op(h, w)))(h), None
            h, _ = jax.lax.scan(body, x, None, length=2)
            return jnp.sum(jnp.tanh(h))
        return jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None)))

    ours = functools.partial(A.sparse_dense, capacity=0.9)
    for wrap in (lambda f: f, jax.checkpoint):
        _assert_tree_bits_equal(make(ours, wrap)(xs, w), make(A.dense_reference, wrap)(xs, w))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("capacity", [0.0, -0.5, 1.5, "0.5", True])
def test_bad_capacity_raises(capacity):
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="capacity"):
        A.sparse_dense(x, jnp.ones((3, 2)), capacity=capacity)
    with pytest.raises(ValueError, match="capacity"):
        SparseLinear(3, 2, capacity=capacity, rngs=nnx.Rngs(0))


def test_non_float_input_raises():
    with pytest.raises(ValueError, match="floating-point"):
        A.relu(jnp.arange(4))
    with pytest.raises(ValueError, match="floating-point"):
        A.sparse_dense(jnp.arange(6).reshape(2, 3), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="kernel"):
        A.sparse_dense(jnp.ones((2, 3)), jnp.ones((4, 2)))


# ------------------------------------------------------------------ Pallas kernels

from ltjax.pallas import residual as R  # noqa: E402

_SMALL = R.BlockSizes(block_words=4)  # keep interpreted grids small


def test_pallas_kernels_across_blocks():
    """Several programs (4-word blocks, the last one partial): each block's offset into the packed
    values, and the tail of the last word; bit-exact against the reference."""
    n = 1000
    mask = jax.random.bernoulli(jax.random.key(100), 0.4, (n,))
    x = jnp.where(mask, jax.random.normal(jax.random.key(101), (n,)), 0.0)
    words = R.pack_mask(mask, block_sizes=_SMALL, interpret=True)
    assert _bits_equal(words, residual.pack_mask_reference(mask))
    np.testing.assert_array_equal(R.unpack_mask(words, n, block_sizes=_SMALL, interpret=True), mask)
    for cap in (n // 4, n):  # overflow and fit
        got = R.pack_sparse(x, cap, block_sizes=_SMALL, interpret=True)
        ref = residual.pack_sparse_reference(x, cap)
        _assert_tree_bits_equal(got, ref)
        dense = R.unpack_sparse(got[0], got[1], (n,), x.dtype, block_sizes=_SMALL, interpret=True)
        assert _bits_equal(dense, residual.unpack_sparse_reference(ref[0], ref[1], (n,), x.dtype))
    assert _bits_equal(dense, x)


def test_pallas_kernels_lower_for_cuda():
    n = 4096 + 7
    m = jax.ShapeDtypeStruct((n,), jnp.bool_)
    x = jax.ShapeDtypeStruct((n,), jnp.float32)
    w = jax.ShapeDtypeStruct((residual.num_words(n),), jnp.uint32)
    v = jax.ShapeDtypeStruct((n // 2,), jnp.float32)
    cases = [(R.pack_mask, (m,)), (lambda w: R.unpack_mask(w, n), (w,)),
             (lambda x: R.pack_sparse(x, n // 2), (x,)),
             (lambda w, v: R.unpack_sparse(w, v, (n,), jnp.float32), (w, v))]
    for fn, args in cases:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text


def test_dispatch_predicate_on_cpu():
    assert not R.can_use_pallas_pack(1024) or jax.default_backend() == "gpu"
