"""Stock Flax attention, DenseGeneral and Einsum on compressed kernels: one ltjax.matmul each.

The proof that no dense kernel exists is the compiled program's own memory analysis
(``temp_size_in_bytes`` below one dense projection), on the stock modules themselves:
``nn.MultiHeadDotProductAttention``, ``nn.DenseGeneral``, ``nn.Einsum``,
``nnx.MultiHeadAttention``, ``nnx.LinearGeneral``, ``nnx.Einsum``. Values are checked
against the same module applied to the decompressed kernels (the only difference left is
the compressed compute path). The signature tests compare ltjax's modules with the installed
flax's, so a flax release that adds an argument fails here.
"""

import doctest
import inspect
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ltjax
import ltjax.nn as lnn
import ltjax.nnx as lnnx
from ltjax import _config, _layout

KEY = jax.random.key(20261207)
INT8 = ltjax.Policy(codec="int8")
E, H, D = 512, 8, 64  # one projection: E x H*D f32 = 1 MiB
PROJ_BYTES = E * H * D * 4


def _is_ct(x):
    return isinstance(x, ltjax.CompressedTensor)


def _x(i, shape=(1, 4, E)):
    return jax.random.normal(jax.random.fold_in(KEY, i), shape)


def _linen(model, params, x):
    """(y, compiled temp bytes) of ``model.apply`` on ``params`` under intercept()."""
    f = jax.jit(model.apply)
    with lnn.intercept():
        y = f({"params": params}, x)
        temp = f.lower({"params": params}, x).compile().memory_analysis().temp_size_in_bytes
    return y, temp


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ---------------------------------------------------------------------- linen
@pytest.mark.parametrize("use_bias", [True, False])
def test_linen_multihead_attention_fused(use_bias, caplog):
    attn = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * D, use_bias=use_bias)
    x = _x(1)
    params = attn.init(jax.random.fold_in(KEY, 2), x)["params"]
    cparams = lnn.compress_params(params, INT8, model=attn, args=(x,))
    assert cparams["query"]["kernel"].shape == (E, H * D)  # [embed, heads, head_dim] as [K, N]
    assert cparams["out"]["kernel"].shape == (H, D, E)  # already the [K, N] storage: keeps its shape
    with caplog.at_level(logging.WARNING, logger="ltjax"):
        y, temp = _linen(attn, cparams, x)
    assert "decompress" not in caplog.text
    assert temp < PROJ_BYTES / 4, f"compiled temp {temp} B holds a dense projection ({PROJ_BYTES} B)"
    # Reference: stock flax on the decoded kernels, un-flattened to the module's shapes.
    ref_params = jax.tree.map(
        lambda c, p: ltjax.decompress(c).reshape(p.shape) if _is_ct(c) else c, cparams, params, is_leaf=_is_ct
    )
    np.testing.assert_allclose(y, attn.apply({"params": ref_params}, x), rtol=2e-5, atol=2e-5)
    assert _rel(y, attn.apply({"params": params}, x)) < 2e-2


def test_linen_attention_plain_compress_tree_fused_by_bias(caplog):
    """compress_tree alone (no model): the bias names each DenseGeneral's features."""
    attn = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * D)  # flax's default: use_bias=True
    x = _x(3)
    params = attn.init(jax.random.fold_in(KEY, 4), x)["params"]
    cparams = ltjax.compress_tree(params, INT8)
    assert cparams["key"]["kernel"].shape == (E, H * D)
    with caplog.at_level(logging.WARNING, logger="ltjax"):
        y, temp = _linen(attn, cparams, x)
    assert "decompress" not in caplog.text
    assert temp < PROJ_BYTES / 4
    assert _rel(y, attn.apply({"params": params}, x)) < 2e-2


def test_linen_attention_without_model_or_bias_falls_back_and_says_how(caplog):
    """The one case the params alone cannot tell: correct values, a dense temp, and the fix logged."""
    attn = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * D, use_bias=False)
    x = _x(5)
    params = attn.init(jax.random.fold_in(KEY, 6), x)["params"]
    cparams = ltjax.compress_tree(params, INT8)
    _config._LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="ltjax"):
        y, temp = _linen(attn, cparams, x)
    assert "model=model" in caplog.text and "query" in caplog.text
    assert temp >= PROJ_BYTES  # the measure sees the dense copies the fused path avoids
    assert _rel(y, attn.apply({"params": params}, x)) < 2e-2


EINSUMS = [  # (equation, x shape, kernel shape)
    ("btd,dhk->bthk", (2, 3, E), (E, H, D)),  # q/k/v projection
    ("bthk,hkd->btd", (2, 3, H, D), (H, D, E)),  # output projection
    ("btd,hkd->bthk", (2, 3, E), (H, D, E)),  # contracted axis last in the kernel: transposed store
    ("...d,dhk->...hk", (3, E), (E, H, D)),  # ellipsis
    ("btd,dhk->bhtk", (2, 3, E), (E, H, D)),  # output axes interleaved
    ("btsd,df->btf", (2, 3, 5, E), (E, H * D)),  # an input axis summed away
]


@pytest.mark.parametrize("eq,xs,ks", EINSUMS)
def test_linen_einsum_fused_against_jnp_einsum(eq, xs, ks, caplog):
    layer = nn.Einsum(ks, eq)
    x = _x(7, xs)
    params = layer.init(jax.random.fold_in(KEY, 8), x)["params"]
    params = dict(params, bias=jax.random.normal(jax.random.fold_in(KEY, 9), params["bias"].shape))
    cparams = lnn.compress_params(params, INT8, model=layer, args=(x,))
    with caplog.at_level(logging.WARNING, logger="ltjax"):
        y, temp = _linen(layer, cparams, x)
    assert "decompress" not in caplog.text
    assert temp < np.prod(ks) * 4 / 2
    contraction, _ = _layout.einsum_contraction(eq, x.ndim, len(ks))
    kernel = contraction.layout.from_matmul(ltjax.decompress(cparams["kernel"]), ks)
    bias = jnp.reshape(params["bias"], layer._get_bias_shape(eq, x, kernel)[1])
    ref = jnp.einsum(eq, x, kernel, precision="highest") + bias
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)
    assert _rel(y, layer.apply({"params": params}, x)) < 2e-2


def test_linen_dense_general_axes_and_non_matmul_einsum():
    x = _x(10, (2, 4, 8, 32))
    layer = nn.DenseGeneral((3, 64), axis=(-2, -1))
    params = layer.init(KEY, x)["params"]
    cparams = lnn.compress_params(params, ltjax.Policy(codec="int8", min_size=0), model=layer, args=(x,))
    assert cparams["kernel"].shape == (8 * 32, 3 * 64)
    y, _ = _linen(layer, cparams, x)
    assert _rel(y, layer.apply({"params": params}, x)) < 2e-2
    # A batch letter shared by x, kernel and output is no matmul: decompressed, still right.
    ein = nn.Einsum((4, 32, 16), "bhd,hdf->bhf", use_bias=False)
    xe = _x(11, (2, 4, 32))
    pe = ein.init(KEY, xe)["params"]
    ce = lnn.compress_params(pe, ltjax.Policy(codec="int8", min_size=0), model=ein, args=(xe,))
    assert ce["kernel"].shape == (4, 32, 16)
    y, _ = _linen(ein, ce, xe)
    want = ein.apply({"params": {"kernel": ltjax.decompress(ce["kernel"])}}, xe)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_linen_scanned_layers_found_by_the_trace():
    """model= also finds nn.scan's stacked kernels: no stacked= pattern to write."""
    from _models import TinyLM

    model, ids = TinyLM(), jax.random.randint(KEY, (2, 16), 0, 512)
    params = model.init(KEY, ids)["params"]
    cparams, report = lnn.compress_params(params, INT8, model=model, args=(ids,), return_report=True)
    q = cparams["blocks"]["query"]["kernel"]
    assert q.shape == (128, 128) and q.stack_shape == (2,)
    assert "stacked" in {l.path: l for l in report.leaves}["blocks/query/kernel"].reason
    with lnn.intercept():
        y = jax.jit(model.apply)({"params": cparams}, ids)
    assert _rel(y, model.apply({"params": params}, ids)) < 2e-2


def test_linen_custom_dot_general_refused_by_name():
    layer = nn.DenseGeneral((4, 32), dot_general=jax.lax.dot_general)
    x = _x(12, (2, 128))
    cparams = ltjax.compress_tree(layer.init(KEY, x)["params"], ltjax.Policy(codec="int8", min_size=0))
    with pytest.raises(ValueError, match="custom dot_general"), lnn.intercept():
        layer.apply({"params": cparams}, x)


# ---------------------------------------------------------------------- nnx
def _nnx_temp(model, x):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return f(state, x), f.lower(state, x).compile().memory_analysis().temp_size_in_bytes


def test_nnx_multihead_attention_fused():
    m = nnx.MultiHeadAttention(num_heads=H, in_features=E, qkv_features=H * D, decode=False, rngs=nnx.Rngs(0))
    x = _x(13)
    ref = m(x)
    report = lnnx.compress_model(m, INT8)
    assert {l.codec for l in report.leaves} == {"int8"} and len(report.leaves) == 4
    assert type(m.query).__name__ == "CompressedLinearGeneral"
    y, temp = _nnx_temp(m, x)
    assert temp < PROJ_BYTES / 4, f"compiled temp {temp} B holds a dense projection ({PROJ_BYTES} B)"
    assert _rel(y, ref) < 2e-2


@pytest.mark.parametrize("eq,xs,ks", EINSUMS[:3])
def test_nnx_einsum_and_linear_general_fused(eq, xs, ks):
    bias_shape = tuple(d for d, c in zip(ks, eq.split(",")[1].split("->")[0]) if c in eq.split("->")[1])
    model = nnx.List([
        nnx.Einsum(eq, ks, bias_shape, rngs=nnx.Rngs(1)),
        nnx.LinearGeneral(E, (H, D), rngs=nnx.Rngs(2)),
    ])
    x = _x(14, xs)
    ein_ref = model[0](x)
    lg_x = _x(15, (2, E))
    lg_ref = model[1](lg_x)
    lnnx.compress_model(model, INT8)
    assert type(model[0]).__name__ == "CompressedEinsum" and model[0].kernel.get_value().ndim == 2
    y, temp = _nnx_temp(model[0], x)
    assert temp < np.prod(ks) * 4 / 2
    layout = model[0].kernel_layout
    kernel = layout.from_matmul(ltjax.decompress(model[0].kernel.get_value()), ks)
    ref = jnp.einsum(eq, x, kernel, precision="highest") + model[0].bias.get_value().reshape(
        model[0]._infer_broadcasted_bias_shape(eq, x, kernel))
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)
    assert _rel(y, ein_ref) < 2e-2
    y, temp = _nnx_temp(model[1], lg_x)
    assert temp < PROJ_BYTES / 4 and _rel(y, lg_ref) < 2e-2


def test_nnx_custom_op_left_dense_with_reason():
    model = nnx.List([nnx.Linear(256, 64, dot_general=lambda *a, **k: jax.lax.dot_general(*a, **k), rngs=nnx.Rngs(0)),
                      nnx.Linear(256, 64, rngs=nnx.Rngs(1))])
    report = lnnx.compress_model(model, INT8)
    reasons = {l.path: (l.codec, l.reason) for l in report.leaves}
    assert reasons["0/kernel"][0] == "dense" and "custom dot_general" in reasons["0/kernel"][1]
    assert reasons["1/kernel"][0] == "int8" and type(model[0]).__name__ == "Linear"


def test_nnx_out_sharding_applied_like_flax():
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((1,), ("m",), axis_types=(AxisType.Explicit,))
    with jax.sharding.set_mesh(mesh):
        m = nnx.MultiHeadAttention(num_heads=4, in_features=128, qkv_features=128, decode=False, rngs=nnx.Rngs(0))
        x = jax.device_put(_x(16, (2, 8, 128)), NamedSharding(mesh, P("m")))
        ref = m(x, out_sharding=P("m"))
        lnnx.compress_model(m, INT8)
        y = nnx.jit(lambda m, x: m(x, out_sharding=P("m")))(m, x)
        assert str(jax.typeof(y)) == str(jax.typeof(ref)) == "float32[2@m,8,128]"
        assert _rel(y, ref) < 2e-2


# ---------------------------------------------------------------------- signatures
def _params(fn):
    return {n: (p.kind, p.default) for n, p in inspect.signature(fn).parameters.items() if n != "self"}


def _same_defaults(a, b):
    return a is b or a == b or (callable(a) and callable(b) and getattr(a, "__name__", 1) == getattr(b, "__name__", 2))


NNX_PAIRS = [
    (lnnx.CompressedLinear, nnx.Linear, ("__init__", "__call__")),
    (lnnx.CompressedLinearGeneral, nnx.LinearGeneral, ("__init__", "__call__")),
    (lnnx.CompressedEinsum, nnx.Einsum, ("__init__", "__call__")),
    (lnnx.CompressedEmbed, nnx.Embed, ("__init__", "__call__", "attend")),
]


@pytest.mark.parametrize("ours,theirs,methods", NNX_PAIRS, ids=lambda v: getattr(v, "__name__", ""))
def test_nnx_signatures_mirror_flax(ours, theirs, methods):
    for name in methods:
        a, b = _params(getattr(ours, name)), _params(getattr(theirs, name))
        assert list(a) == list(b), f"{ours.__name__}.{name}: {list(a)} != flax's {list(b)}"
        for arg, (kind, default) in b.items():
            assert a[arg][0] == kind and _same_defaults(a[arg][1], default), f"{ours.__name__}.{name}({arg})"


def test_linen_intercepted_calls_handle_every_flax_argument():
    for (cls, method), handled in lnn.HANDLED_ARGS.items():
        assert tuple(_params(getattr(cls, method))) == handled, f"{cls.__name__}.{method}"
    for ours, theirs in [(lnn.CompressedDense, nn.Dense), (lnn.CompressedDenseGeneral, nn.DenseGeneral),
                         (lnn.CompressedEmbed, nn.Embed)]:
        fields = lambda c: {f for f in c.__dataclass_fields__ if f not in ("parent", "name")}
        assert fields(theirs) <= fields(ours) | {"dot_general", "dot_general_cls"}, ours.__name__
        assert list(_params(ours.__call__)) == list(_params(theirs.__call__))


def test_docstring_examples_run():
    for mod in (lnn, lnnx):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, (mod.__name__, result)


# ---------------------------------------------------------------------- the contraction itself
def test_einsum_contraction_rejects_what_is_no_matmul():
    for eq, x_ndim, k_ndim, why in [
        ("bhd,hdf->bhf", 3, 3, "batch axes"),
        ("bd,dd->bd", 2, 2, "repeated letter"),
        ("bd,d->b", 2, 1, "no contracted axis or no feature"),
        ("bd,dfg->bf", 2, 3, "summed over the kernel alone"),
        ("bd,...d->bd", 2, 2, "ellipsis in the kernel"),
        ("bd,de", 2, 2, "explicit two-operand"),
    ]:
        c, reason = _layout.einsum_contraction(eq, x_ndim, k_ndim)
        assert c is None and why in reason, (eq, reason)


@pytest.mark.parametrize("seed", range(3))
def test_layout_round_trip_random(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(2, 6, size=rng.integers(2, 5)))
    perm = tuple(int(p) for p in rng.permutation(len(shape)))
    layout = _layout.Layout(perm, int(rng.integers(1, len(shape))))
    a = rng.standard_normal((3,) + shape).astype(np.float32)
    w2 = layout.to_matmul(a)
    assert w2.shape == (3,) + layout.matmul_shape(shape)
    for i in range(3):
        np.testing.assert_array_equal(layout.from_matmul(jnp.asarray(w2[i]), shape), a[i])
