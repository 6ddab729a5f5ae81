"""ltjax.matmul / ltjax.decompress: forward and gradients against the jnp reference, jit, vmap,
dispatch and bad input."""

from __future__ import annotations

import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ltjax
from ltjax import _ops
from ltjax._format import decompress_reference, pack

CODECS = ("raw", "int8", "bitmask", "bitmask_int8")
# (K, N, tile): ragged tiles in both directions, a whole-row tile that is not a multiple of 32,
# and the default geometry.
GEOMETRIES = ((70, 45, (16, 32)), (300, 130, None), (33, 64, (8, 33)))
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def make_ct(codec, k, n, tile, *, seed=0, sparsity=0.6, dtype=np.float32):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    if codec in ("bitmask", "bitmask_int8"):
        w[rng.random((k, n)) < sparsity] = 0.0
    return pack(w.astype(dtype), codec, tile=tile)


def rand(shape, dtype=jnp.float32, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def assert_close(a, b, rel):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    err, scale = np.abs(a - b).max(initial=0.0), np.abs(b).max(initial=0.0)
    assert err <= rel * scale + 1e-6, f"max err {err} vs scale {scale} (rel {rel})"


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("k,n,tile", GEOMETRIES)
@pytest.mark.parametrize("batch", [(1,), (2, 3), (20,)])
def test_matmul_forward(codec, k, n, tile, batch, impl=None):
    ct = make_ct(codec, k, n, tile)
    x = rand(batch + (k,))
    y = jax.jit(lambda x, ct: ltjax.matmul(x, ct, impl=impl))(x, ct)
    assert y.shape == batch + (n,) and y.dtype == x.dtype
    assert_close(y, _ops.matmul_reference(x, ct), 2e-5)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("m", [1, 4, 40])
def test_matmul_bf16(codec, m):
    ct = make_ct(codec, 96, 80, (32, 32))
    x = rand((m, 96), jnp.bfloat16)
    y = jax.jit(ltjax.matmul)(x, ct)
    assert y.dtype == jnp.bfloat16
    assert_close(y, _ops.matmul_reference(x, ct), TOL[jnp.bfloat16])


@pytest.mark.parametrize("codec", ("raw", "bitmask"))
def test_matmul_bf16_weights(codec):
    ct = make_ct(codec, 64, 48, None, dtype=jnp.bfloat16)
    x = rand((3, 64))
    assert_close(ltjax.matmul(x, ct), _ops.matmul_reference(x, ct), 2e-5)


def _grads(f, x, ct):
    loss = lambda x, ct: jnp.sum(jnp.sin(f(x, ct)) * jnp.arange(1, ct.shape[1] + 1, dtype=jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(x, ct)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("m", [1, 3, 20])
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_matmul_grads(codec, m, impl):
    k, n, tile = 70, 45, (16, 32)
    ct = make_ct(codec, k, n, tile)
    x = rand((m, k))
    gx, gct = _grads(lambda x, ct: ltjax.matmul(x, ct, impl=impl), x, ct)
    rx, rct = _grads(_ops.matmul_reference, x, ct)
    assert_close(gx, rx, 2e-5)
    for f in ("scales", "values"):
        if getattr(ct, f) is not None:
            assert_close(getattr(gct, f), getattr(rct, f), 2e-5)
    for f in ("codes", "mask", "offsets", "checksums"):
        a = getattr(ct, f)
        if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
            assert getattr(gct, f).dtype == jax.dtypes.float0 and getattr(gct, f).shape == a.shape


def test_matmul_grad_batch_dims_bf16():
    ct = make_ct("int8", 64, 40, None)
    x = rand((2, 3, 64), jnp.bfloat16)
    g = jax.grad(lambda x: jnp.sum(ltjax.matmul(x, ct).astype(jnp.float32) ** 2))(x)
    r = jax.grad(lambda x: jnp.sum(_ops.matmul_reference(x, ct).astype(jnp.float32) ** 2))(x)
    assert g.dtype == jnp.bfloat16
    assert_close(g, r, 3e-2)


@pytest.mark.parametrize("codec", CODECS)
def test_matmul_vmap(codec):
    ct = make_ct(codec, 70, 45, (16, 32))
    x = rand((3, 2, 70))
    y = jax.jit(jax.vmap(lambda xi: ltjax.matmul(xi, ct)))(x)
    assert_close(y, _ops.matmul_reference(x, ct), 2e-5)
    g = jax.vmap(jax.grad(lambda xi: jnp.sum(ltjax.matmul(xi, ct) ** 2)))(x)
    r = jax.vmap(jax.grad(lambda xi: jnp.sum(_ops.matmul_reference(xi, ct) ** 2)))(x)
    assert_close(g, r, 2e-5)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("k,n,tile", GEOMETRIES)
def test_decompress_and_vjp(codec, k, n, tile, impl=None):
    ct = make_ct(codec, k, n, tile)
    np.testing.assert_array_equal(jax.jit(lambda c: ltjax.decompress(c, impl=impl))(ct), decompress_reference(ct))
    w = rand((k, n), seed=3)
    loss = lambda f: (lambda ct: jnp.sum(f(ct) * w))
    g = jax.grad(loss(lambda c: ltjax.decompress(c, impl=impl)), allow_int=True)(ct)
    r = jax.grad(loss(decompress_reference), allow_int=True)(ct)
    for f in ("scales", "values"):
        if getattr(ct, f) is not None:
            assert_close(getattr(g, f), getattr(r, f), 1e-5)


@pytest.mark.parametrize("codec", ["bitmask", "bitmask_int8"])
def test_decompress_cpu_default_uses_ffi_unpack(codec):
    """On one CPU device with the extension built, bitmask decompress runs the FFI unpack handler."""
    ct = make_ct(codec, 70, 45, (16, 32))
    cfg = _ops._choose_decompress_impl(ct, None)
    from ltjax import ffi

    if jax.default_backend() == "cpu" and jax.device_count() == 1 and ffi.available():
        assert cfg.impl == "ffi"
    np.testing.assert_array_equal(ltjax.decompress(ct, impl=cfg.impl), decompress_reference(ct))


def test_decompress_other_axis():
    ct = pack(np.random.default_rng(0).standard_normal((6, 40, 5)).astype(np.float32), "bitmask_int8", axis=1)
    np.testing.assert_array_equal(ltjax.decompress(ct), decompress_reference(ct))


def test_dense_scale_cotangent_fits_finetuning():
    """Fine-tuning the scales moves the output towards a target (the gradient is usable)."""
    ct = make_ct("int8", 32, 16, None)
    x, target = rand((8, 32)), rand((8, 16), seed=5)
    loss = lambda s: jnp.mean((ltjax.matmul(x, ct.__class__(header=ct.header, codes=ct.codes, scales=s,
                                                             checksums=ct.checksums)) - target) ** 2)
    s = ct.scales
    l0 = loss(s)
    for _ in range(5):
        s = s - 1e-7 * jax.grad(loss)(s)
    assert loss(s) < l0


# ------------------------------------------------------------------------ dispatch
def test_dispatch_cpu_default():
    """On CPU: the FFI handlers when they are built (one device), else the fused XLA path."""
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU dispatch rule")
    ct = make_ct("int8", 64, 32, None)
    want = "ffi" if _ops.can_use_ffi(rand((1, 64)), ct) else "xla"
    assert _ops._choose_impl(rand((1, 64)), ct, None).impl == want
    assert _ops._choose_impl(rand((1, 64)), ct, "xla").impl == "xla"


def test_fallback_to_reference_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(_ops, "_pallas", None)  # on a GPU the kernels would take this axis=0 weight
    ct = pack(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), "int8", axis=0)
    x = rand((2, 64))
    _ops._logged_reasons.clear()
    with caplog.at_level(logging.INFO, logger="ltjax"):
        y1 = ltjax.matmul(x, ct)
        y2 = ltjax.matmul(x, ct)
    assert_close(y1, _ops.matmul_reference(x, ct), 2e-5)
    np.testing.assert_array_equal(y1, y2)
    msgs = [r.getMessage() for r in caplog.records if "reference" in r.getMessage()]
    assert len(msgs) == 1 and "axis=0" in msgs[0]
    with pytest.raises(ValueError, match="axis=0"):
        ltjax.matmul(x, ct, impl="xla")


def test_forced_unavailable_impls_raise(monkeypatch):
    monkeypatch.setattr(_ops, "_pallas", None)
    monkeypatch.setattr(_ops, "_ffi", None)
    monkeypatch.setattr(_ops, "_gemv", None)
    ct = make_ct("int8", 64, 32, None)
    with pytest.raises(ValueError, match="pallas"):
        ltjax.matmul(rand((1, 64)), ct, impl="pallas")
    with pytest.raises(ValueError, match="ffi"):
        ltjax.matmul(rand((1, 64)), ct, impl="ffi")
    with pytest.raises(ValueError, match="impl='cuda' cannot run: ltjax.ffi.gemv is not available"):
        ltjax.matmul(rand((1, 64)), ct, impl="cuda")
    with pytest.raises(ValueError, match="impl='triton' is not an implementation"):
        ltjax.matmul(rand((1, 64)), ct, impl="triton")


def _fake_kernels(calls):
    """A stand-in for ltjax.pallas / ltjax.ffi with the agreed interface, built on the reference."""

    def matmul(x2, ct, **kw):
        calls.append(("matmul", kw))
        return _ops.matmul_reference(x2, ct)

    def matmul_t(dy2, ct, **kw):
        calls.append(("matmul_t", kw))
        w = decompress_reference(ct).astype(jnp.float32)
        return jnp.matmul(dy2.astype(jnp.float32), w.T, precision=jax.lax.Precision.HIGHEST).astype(dy2.dtype)

    return types.SimpleNamespace(can_use_pallas=lambda x, ct, **kw: True, why_not_pallas=lambda x, ct, **kw: None,
                                 can_use_ffi=lambda x, ct: True,
                                 matmul=matmul, matmul_t=matmul_t,
                                 decompress=lambda ct, **kw: decompress_reference(ct))


@pytest.mark.parametrize("which", ["pallas", "ffi"])
def test_dispatch_to_kernel_modules(monkeypatch, which):
    calls = []
    monkeypatch.setattr(_ops, "_" + which, _fake_kernels(calls))
    if which == "ffi":  # the FFI predicate also requires the CPU backend; the fake runs anywhere
        monkeypatch.setattr(_ops, "_backend", lambda: "cpu")
    ct = make_ct("bitmask_int8", 70, 45, (16, 32))
    x = rand((3, 70))
    gx, gct = _grads(lambda x, ct: ltjax.matmul(x, ct, impl=which), x, ct)
    rx, rct = _grads(_ops.matmul_reference, x, ct)
    assert_close(gx, rx, 2e-5)
    assert_close(gct.scales, rct.scales, 2e-5)
    assert [c[0] for c in calls][:2] == ["matmul", "matmul_t"]
    if which == "pallas" and jax.default_backend() == "cpu":
        assert calls[0][1] == {"interpret": True}
    if which == "ffi" and jax.default_backend() == "cpu":
        assert _ops._choose_impl(x, ct, None).impl == "ffi"


def test_int8_above_64_rows_on_cpu():
    """M = 100: on CPUs with AMX the int8 forward stays on the FFI (its AMX GEMM beats the XLA
    path at every M) and the backward's dx goes to the XLA path; elsewhere both take the XLA
    path. Values and gradients match the reference either way."""
    from ltjax import ffi

    ct = make_ct("int8", 130, 70, None)
    x = rand((100, 130))
    if jax.default_backend() == "cpu" and jax.device_count() == 1 and ffi.available():
        assert ltjax.matmul_impl(x, ct) == ("ffi" if ffi.info()["amx"] else "xla")
    assert_close(jax.jit(ltjax.matmul)(x, ct), _ops.matmul_reference(x, ct), 2e-5)
    gx, gct = _grads(ltjax.matmul, x, ct)
    rx, rct = _grads(_ops.matmul_reference, x, ct)
    assert_close(gx, rx, 2e-5)
    assert_close(gct.scales, rct.scales, 2e-5)


# ------------------------------------------------------------------------ bad input
def test_bad_input():
    ct = make_ct("int8", 64, 32, None)
    with pytest.raises(ValueError, match=r"x.shape=\(4, 63\).*ct.shape=\(64, 32\)"):
        ltjax.matmul(jnp.ones((4, 63)), ct)
    with pytest.raises(ValueError, match=r"x.dtype=int32.*\(4, 64\)"):
        ltjax.matmul(jnp.ones((4, 64), jnp.int32), ct)
    ct3 = pack(np.ones((4, 8, 16), np.float32), "int8")
    with pytest.raises(ValueError, match=r"2-D.*ct.shape=\(4, 8, 16\)"):
        ltjax.matmul(jnp.ones((2, 4)), ct3)
    with pytest.raises(ValueError, match=r"x.shape=\(\)"):
        ltjax.matmul(jnp.float32(1.0), ct)
    with pytest.raises(ValueError, match="CompressedTensor"):
        ltjax.matmul(jnp.ones((4, 64)), jnp.ones((64, 32)))


@pytest.mark.parametrize("codec", ["int8", "bitmask_int8", "bitmask"])
def test_public_op_through_real_pallas_kernels(codec):
    """`ltjax.matmul(impl="pallas")` runs the real kernels (interpret mode off-GPU), forward and VJP."""
    from ltjax._format import pack

    rng = np.random.default_rng(21)
    w = rng.standard_normal((200, 150)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    ct = pack(w, codec, tile=(64, 96))
    x = jnp.asarray(rng.standard_normal((3, 200)).astype(np.float32))
    dy = jnp.asarray(rng.standard_normal((3, 150)).astype(np.float32))
    y, vjp = jax.vjp(lambda x: ltjax.matmul(x, ct, impl="pallas"), x)
    y_ref, vjp_ref = jax.vjp(lambda x: ltjax.matmul_reference(x, ct), x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(vjp(dy)[0], vjp_ref(dy)[0], rtol=1e-5, atol=1e-4)
