"""ltjax.nn (linen) and ltjax.nnx on unmodified Flax models, against independent references.

References: the same model applied to dense params (within the int8 error) and to the
decompressed params (tight: the only difference left is the compressed compute path).
"""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import MLP, TinyLM

import ltjax
import ltjax.nn as lnn

KEY = jax.random.key(20261127)
INT8 = ltjax.Policy(codec="int8")
LOSSLESS = ltjax.Policy(codec="auto", codecs=("raw", "bitmask"))
QKV = {"*/query/kernel": 1, "*/key/kernel": 1, "*/value/kernel": 1}


def _is_ct(x):
    return isinstance(x, ltjax.CompressedTensor)


def decompressed(ctree, like):
    """Dense twin of a compressed tree (stacked leaves decoded per layer, shapes as ``like``)."""

    def dec(c, ref):
        if not _is_ct(c):
            return c
        d = jax.vmap(ltjax.decompress)(c) if c.checksums.ndim > 1 else ltjax.decompress(c)
        return d.reshape(ref.shape)

    return jax.tree.map(dec, ctree, like, is_leaf=_is_ct)


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def mlp():
    k1, k2 = jax.random.split(jax.random.fold_in(KEY, 1))
    x = jax.random.normal(k1, (8, 128))
    return MLP(), jax.jit(MLP().init)(k2, x)["params"], x


@pytest.fixture(scope="module")
def lm():
    k1, k2 = jax.random.split(jax.random.fold_in(KEY, 2))
    ids = jax.random.randint(k1, (2, 16), 0, 512)
    return TinyLM(), jax.jit(TinyLM().init)(k2, ids)["params"], ids


def run(model, params, *args):
    with lnn.intercept():
        return jax.jit(model.apply)({"params": params}, *args)


# ---------------------------------------------------------------------- forward
def test_mlp_int8_within_error_and_exact_vs_decoded(mlp):
    model, params, x = mlp
    cparams, report = ltjax.compress_tree(params, INT8, return_report=True)
    assert {l.codec for l in report.leaves if l.path.endswith("kernel")} == {"int8"}
    y = run(model, cparams, x)
    dense = model.apply({"params": params}, x)
    np.testing.assert_allclose(y, model.apply({"params": decompressed(cparams, params)}, x), rtol=1e-5, atol=1e-5)
    assert rel(y, dense) < 2e-2


def test_mlp_lossless_equal(mlp):
    model, params, x = mlp
    # Prune half the weights so `auto` picks bitmask (exact) for the kernels.
    pruned = jax.tree.map(lambda p: jnp.where(jnp.abs(p) < jnp.median(jnp.abs(p)), 0.0, p) if p.ndim == 2 else p,
                          params)
    cparams, report = ltjax.compress_tree(pruned, LOSSLESS, return_report=True)
    assert {l.codec for l in report.leaves if l.path.endswith("kernel")} == {"bitmask"}
    np.testing.assert_allclose(run(model, cparams, x), model.apply({"params": pruned}, x), rtol=1e-6, atol=1e-6)


def test_transformer_scan_remat_int8(lm, caplog):
    model, params, ids = lm
    cparams, report = lnn.compress_params(params, INT8, stacked="blocks/*", flatten=QKV, return_report=True)
    by_path = {l.path: l for l in report.leaves}
    assert by_path["blocks/query/kernel"].codec == "int8" and "stacked" in by_path["blocks/query/kernel"].reason
    assert cparams["blocks"]["query"]["kernel"].shape == (128, 128)  # one layer, flattened [E, H*D]
    assert cparams["Embed_0"]["embedding"].header.axis == 0
    with caplog.at_level(logging.WARNING, logger="ltjax"):
        y = run(model, cparams, ids)
    assert not [r for r in caplog.records if "decompress" in r.getMessage()], caplog.text
    ref = model.apply({"params": decompressed(cparams, params)}, ids)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert rel(y, model.apply({"params": params}, ids)) < 2e-2


def test_transformer_lossless_equal(lm):
    model, params, ids = lm
    # Random dense weights: no lossless codec saves space, so force `raw` to run every kernel compressed.
    cparams, report = lnn.compress_params(params, ltjax.Policy(codec="raw"), stacked="blocks/*", return_report=True)
    assert sum(_is_ct(l) for l in jax.tree.leaves(cparams, is_leaf=_is_ct)) >= 10
    np.testing.assert_allclose(run(model, cparams, ids), model.apply({"params": params}, ids), rtol=1e-5, atol=1e-5)


def test_plain_compress_tree_nd_kernels_run(lm):
    """The plain path: compress_tree reads each DenseGeneral's features from its bias."""
    model, params, ids = lm
    flat = {k: v for k, v in params.items() if k != "blocks"}
    cflat = ltjax.compress_tree(flat, INT8)
    assert cflat["last"]["query"]["kernel"].shape == (128, 128)  # [E, H, D] stored as its [K, N] matmul kernel
    assert cflat["last"]["out"]["kernel"].shape == (4, 32, 128)  # N-D [in, features]: header view, matmul
    cparams = dict(cflat, blocks=params["blocks"])  # scanned layers stay dense under plain compress_tree
    ref = model.apply({"params": decompressed(cparams, params)}, ids)
    np.testing.assert_allclose(run(model, cparams, ids), ref, rtol=1e-4, atol=1e-4)


def test_compressed_modules_match_flax():
    x = jax.random.normal(jax.random.fold_in(KEY, 3), (3, 7, 4, 32), jnp.bfloat16)
    for ours, theirs in [
        (lnn.CompressedDense(96, dtype=jnp.bfloat16), nn.Dense(96, dtype=jnp.bfloat16)),
        (lnn.CompressedDenseGeneral((3, 64), axis=(-2, -1)), nn.DenseGeneral((3, 64), axis=(-2, -1))),
    ]:
        params = theirs.init(jax.random.fold_in(KEY, 4), x)["params"]
        assert jax.tree.map(jnp.shape, ours.init(KEY, x)["params"]) == jax.tree.map(jnp.shape, params)
        cparams = ltjax.compress_tree(params, ltjax.Policy(codec="int8", min_size=0))
        y = jax.jit(ours.apply)({"params": cparams}, x)
        ref = theirs.apply({"params": decompressed(cparams, params)}, x)
        assert y.dtype == ref.dtype and y.shape == ref.shape
        np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=2e-2, atol=2e-2)
    ids = jax.random.randint(KEY, (5, 3), -4, 300)
    emb = nn.Embed(300, 64)
    params = emb.init(KEY, ids)["params"]
    for axis in (0, 1):
        cparams = ltjax.compress_tree(params, ltjax.Policy(codec="int8", axes=(("*", axis),)))
        dec = {"embedding": ltjax.decompress(cparams["embedding"])}
        np.testing.assert_array_equal(lnn.CompressedEmbed(300, 64).apply({"params": cparams}, ids),
                                      emb.apply({"params": dec}, ids))
        q = jax.random.normal(KEY, (2, 64))
        out = lnn.CompressedEmbed(300, 64).apply({"params": cparams}, q, method="attend")
        np.testing.assert_allclose(out, emb.apply({"params": dec}, q, method="attend"), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- gradients, fine-tuning
def _split(ctree):
    """(compressed leaves, dense leaves) as two trees with None holes."""
    comp = jax.tree.map(lambda l: l if _is_ct(l) else None, ctree, is_leaf=_is_ct)
    dense = jax.tree.map(lambda l: None if _is_ct(l) else l, ctree, is_leaf=_is_ct)
    return comp, dense


def _merge(comp, dense):
    return jax.tree.map(lambda c, d: d if c is None else c, comp, dense, is_leaf=lambda x: x is None or _is_ct(x))


def test_grads_inputs_and_dense_params(lm):
    model, params, ids = lm
    cparams = lnn.compress_params(params, INT8, stacked="blocks/*", flatten=QKV)
    comp, dense = _split(cparams)
    ref_params = decompressed(cparams, params)
    x = jax.random.normal(jax.random.fold_in(KEY, 5), (2, 16, 128))
    tgt = jax.random.normal(jax.random.fold_in(KEY, 6), (2, 16, 512))

    def loss(dense_params, x, comp):
        with lnn.intercept():
            h = model.apply({"params": _merge(comp, dense_params)}, x, )
        return jnp.mean((h - tgt) ** 2)

    def ref_loss(dense_params, x):
        full = jax.tree.map(lambda r, d: r if d is None else d, ref_params, dense_params, is_leaf=lambda v: v is None)
        return jnp.mean((model.apply({"params": full}, x, ) - tgt) ** 2)

    g, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(dense, x, comp)
    rg, rgx = jax.grad(ref_loss, argnums=(0, 1))(dense, x)
    np.testing.assert_allclose(gx, rgx, rtol=1e-3, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(rg)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_optax_finetune_frozen_compressed(mlp):
    model, params, x = mlp
    comp, dense = _split(ltjax.compress_tree(params, INT8))
    y = jax.random.normal(jax.random.fold_in(KEY, 7), (8, 64))
    opt = optax.adam(1e-2)
    state = opt.init(dense)

    @jax.jit
    def step(dense, state, comp):
        def loss(d):
            with lnn.intercept():
                return jnp.mean((model.apply({"params": _merge(comp, d)}, x) - y) ** 2)

        l, g = jax.value_and_grad(loss)(dense)
        upd, state = opt.update(g, state, dense)
        return optax.apply_updates(dense, upd), state, l

    losses = []
    for _ in range(5):
        dense, state, l = step(dense, state, comp)
        losses.append(float(l))
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------- bad input
def test_shape_mismatch_names_module_path(mlp):
    model, params, x = mlp
    kernel = ltjax.compress(np.ones((256, 128), np.float32), "int8")
    wrong = dict(params, Dense_1=dict(params["Dense_1"], kernel=kernel))
    with pytest.raises(ValueError, match="Dense_1"):
        run(model, wrong, x)


def test_unknown_paths_reported(mlp):
    _, params, _ = mlp
    _, report = ltjax.compress_tree(params, ltjax.Policy(codec="int8", skip=("Dense_9/*",)), return_report=True)
    assert report.unmatched_skip == ("Dense_9/*",)
    _, report = lnn.compress_params(params, ltjax.Policy(codec="int8", skip=("Dense_9/*",)), return_report=True)
    assert report.unmatched_skip == ("Dense_9/*",)
    with pytest.raises(ValueError, match="nope/"):
        lnn.compress_params(params, INT8, stacked="nope/*")
    with pytest.raises(ValueError, match="stacked"):
        stacked = lnn.compress_params(jax.tree.map(lambda p: jnp.stack([p, p]), params), INT8, stacked="*")
        run(MLP(), stacked, jnp.ones((1, 128)))


# ---------------------------------------------------------------------- nnx
def _nnx_model():
    from _models import NnxModel
    from flax import nnx

    return NnxModel(nnx.Rngs(3))


def test_nnx_compress_model_int8():
    from flax import nnx

    import ltjax.nnx as lnnx

    model = _nnx_model()
    ids = jax.random.randint(jax.random.fold_in(KEY, 8), (2, 16), 0, 512)
    dense_out = model(ids)
    report = lnnx.compress_model(model, ltjax.Policy(codec="int8", skip=("missing/*",)))
    assert report.unmatched_skip == ("missing/*",)
    assert type(model.layers[0]).__name__ == "CompressedLinear"
    assert type(model.seq.layers[2]).__name__ == "CompressedLinear"
    assert type(model.attn_in).__name__ == "CompressedLinearGeneral"
    assert type(model.embed).__name__ == "CompressedEmbed"
    assert {l.codec for l in report.leaves} == {"int8"} and len(report.leaves) == 7
    out = nnx.jit(lambda m, i: m(i))(model, ids)
    assert rel(out, dense_out) < 2e-2
    # Independent reference: the same architecture with the decoded kernels, dense.
    ref_model = _nnx_model()
    for path, var in nnx.iter_graph(model):
        if isinstance(var, lnnx.CompressedParam):
            target = ref_model
            for k in path[:-1]:
                target = target[k] if isinstance(k, int) else getattr(target, k)
            dense_var = getattr(target, path[-1])
            dense_var.set_value(ltjax.decompress(var.get_value()).reshape(dense_var.shape))
        elif isinstance(var, nnx.Param):
            pass
    np.testing.assert_allclose(out, ref_model(ids), rtol=1e-4, atol=1e-4)
    # Compressed leaves are not Params: grads and optimizers see only biases, norms.
    assert not any(_is_ct(l) for l in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=_is_ct))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    tgt = jax.random.normal(KEY, dense_out.shape)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(ids) - tgt) ** 2))(model)
        opt.update(model, g)
        return loss

    losses = [float(step(model, opt)) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert isinstance(model.layers[0].kernel.get_value(), ltjax.CompressedTensor)


# ---------------------------------------------------------------------- checkpoints
def _assert_same_tree(a, b):
    fa, ta = jax.tree_util.tree_flatten(a, is_leaf=_is_ct)
    fb, tb = jax.tree_util.tree_flatten(b, is_leaf=_is_ct)
    assert ta == tb
    for x, y in zip(fa, fb):
        if _is_ct(x):
            assert x.header == y.header
            for name, arr in x.arrays().items():
                np.testing.assert_array_equal(np.asarray(arr), np.asarray(y.arrays()[name]))
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoints_ltjax_and_orbax(mlp, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    model, params, x = mlp
    cparams = ltjax.compress_tree(params, INT8)
    ltjax.save(tmp_path / "mlp.lt", cparams)
    _assert_same_tree(ltjax.load(tmp_path / "mlp.lt"), cparams)
    # orbax (the standard Flax checkpointer): headers are static, so restore against an abstract target.
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "orbax", cparams)
        ckptr.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, cparams)
        restored = ckptr.restore(tmp_path / "orbax", abstract)
    _assert_same_tree(restored, cparams)
    np.testing.assert_array_equal(run(model, restored, x), run(model, cparams, x))


# ---------------------------------------------------------------------- memory
def _mem(fn, *args):
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    return m.argument_size_in_bytes, m.temp_size_in_bytes


def test_compiled_memory_below_dense():
    model = MLP(hidden=1024, out=1024)
    x = jax.random.normal(KEY, (1, 1024))
    params = jax.jit(model.init)(KEY, x)["params"]
    cparams, report = ltjax.compress_tree(params, INT8, return_report=True)

    def capply(p, x):
        with lnn.intercept():
            return model.apply({"params": p}, x)

    dense_args, dense_temp = _mem(lambda p, x: model.apply({"params": p}, x), params, x)
    c_args, c_temp = _mem(capply, cparams, x)
    print(f"dense args={dense_args} temp={dense_temp}; compressed args={c_args} temp={c_temp}; "
          f"ratio={report.ratio:.2f}")
    assert (c_args + c_temp) * report.ratio * 0.9 <= dense_args
