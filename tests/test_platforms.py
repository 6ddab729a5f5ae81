"""A program lowered for another platform holds that platform's path (no GPU needed to check).

``jax.jit(f).trace(...).lower(lowering_platforms=...)`` from this CPU host: for ``("cuda",)``
the module must hold the Pallas (Triton) kernel and none of the CPU handlers; for ``("cpu",)``
the CPU path; for ``("cpu", "cuda")`` both, and `jax.export` of it must run here with the
values of the reference (`matmul_reference` on fresh random weights).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, make_ct
from jax import export

import ltjax
from ltjax import ffi

TRITON = "__gpu$xla.gpu.triton"
RNG = np.random.default_rng(20261207)


def _targets(f, *args, platforms):
    text = jax.jit(f).trace(*args).lower(lowering_platforms=platforms).as_text()
    return set(re.findall(r"stablehlo.custom_call @([\w$.]+)", text))


def _weight(codec, k=256, n=128):
    return make_ct(codec, k, n, sparsity=0.5 if codec.startswith("bitmask") else 0.0)


def _matmul(x, ct):
    return ltjax.matmul(x, ct)


def _grad_x(x, ct):
    return jax.grad(lambda x: ltjax.matmul(x, ct).sum())(x)


def _decompress(x, ct):
    return ltjax.decompress(ct)


@pytest.mark.parametrize("codec", ["int8", "bitmask_int8"])
@pytest.mark.parametrize("fn", [_matmul, _grad_x, _decompress], ids=lambda f: f.__name__)
def test_cuda_lowering_from_cpu_host_holds_gpu_kernels(codec, fn):
    ct, x = _weight(codec), jnp.ones((2, 256))
    cuda = _targets(fn, x, ct, platforms=("cuda",))
    assert TRITON in cuda and not any(t.startswith("ltjax_") for t in cuda), cuda
    cpu = _targets(fn, x, ct, platforms=("cpu",))
    assert TRITON not in cpu
    if ffi.available() and fn is not _decompress:
        assert any(t.startswith("ltjax_") for t in cpu), cpu
    both = _targets(fn, x, ct, platforms=("cpu", "cuda"))
    assert both == cpu | cuda


def test_matmul_impl_per_platform():
    ct, x = _weight("int8"), jax.ShapeDtypeStruct((1, 256), jnp.float32)
    assert ltjax.explain(x, ct, platform="cuda").impl == "pallas"
    assert ltjax.explain(x, ct, platform="cpu").impl == ("ffi" if ffi.available() else "xla")
    assert ltjax.explain(x, ct).platform == "cpu"  # this host
    assert ltjax.explain(x, ct, impl="xla", platform="cuda").impl == "xla"  # forced: everywhere


def _export(f, *args):
    lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cpu", "cuda"))
    # ltjax's custom calls carry no cross-version compatibility promise, so export must be told.
    targets = re.findall(r"stablehlo.custom_call @([\w$.]+)", lowered.as_text())
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in targets]
    return export.export(jax.jit(f), platforms=("cpu", "cuda"), disabled_checks=checks)(*args)


@pytest.mark.parametrize("codec", ["int8", "bitmask_int8", "bitmask", "raw"])
def test_multi_platform_export_runs_here(codec):
    ct = _weight(codec)
    x = jnp.asarray(RNG.standard_normal((3, 256)).astype(np.float32))
    exp = _export(_matmul, x, ct)
    assert exp.platforms == ("cpu", "cuda")
    assert_close(exp.call(x, ct), ltjax.matmul_reference(x, ct))
    g = _export(_grad_x, x, ct).call(x, ct)
    assert_close(g, jax.grad(lambda x: jnp.sum(ltjax.matmul_reference(x, ct)))(x))


def test_per_platform_under_vmap_and_grad_of_scales():
    """The platform switch batches (vmap over x, over a stack of weights) and keeps scale gradients."""
    w = RNG.standard_normal((4, 256, 128)).astype(np.float32)
    stack = ltjax.nn.compress_params({"k": w}, ltjax.Policy(codec="int8"), stacked="k")["k"]
    x = jnp.asarray(RNG.standard_normal((4, 2, 256)).astype(np.float32))
    y = jax.jit(jax.vmap(ltjax.matmul))(x, stack)
    ref = jax.vmap(ltjax.matmul_reference)(x, stack)
    assert_close(y, ref)
    want = jax.vmap(lambda c: ltjax.decompress(c, impl="reference"))(stack)
    np.testing.assert_allclose(jax.jit(ltjax.decompress)(stack), want, rtol=1e-6, atol=1e-6)
    ct = _weight("int8")
    xs = x[0]
    gs = jax.grad(lambda s: ltjax.matmul(xs, ct.__class__(header=ct.header, codes=ct.codes, scales=s,
                                                             checksums=ct.checksums)).sum())(ct.scales)
    gref = jax.grad(lambda s: ltjax.matmul_reference(xs, ct.__class__(header=ct.header, codes=ct.codes, scales=s,
                                                                     checksums=ct.checksums)).sum())(ct.scales)
    assert_close(gs, gref)


def test_compressed_activation_residual_per_platform():
    """ltjax.nn.relu's 1-bit residual: the Pallas pack/unpack kernels in a CUDA program, jnp on CPU."""
    x = jnp.asarray(RNG.standard_normal((64, 256)).astype(np.float32))

    def f(x):
        return jax.grad(lambda x: (ltjax.nn.relu(x) ** 2).sum())(x)

    assert TRITON in _targets(f, x, platforms=("cuda",))
    assert TRITON not in _targets(f, x, platforms=("cpu",))
    np.testing.assert_allclose(jax.jit(f)(x), jax.grad(lambda x: (jax.nn.relu(x) ** 2).sum())(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_export(lambda x: f(x), x).call(x), jax.jit(f)(x), rtol=1e-6, atol=1e-6)
