"""`ltjax.index_rows`: the row starts a bitmask tensor may carry so the GPU kernels stop counting
them from the mask in every call. Checked against a count over the dense mask in numpy, through
every matmul path that reads them, and through save / load / shard / grad / vmap."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, random_weight

import ltjax
import ltjax.ffi as lffi
from ltjax import pallas as lp
from ltjax._format import pack, row_starts
from ltjax.pallas import BlockSizes

needs_ffi = pytest.mark.skipif(not lffi.available(), reason=f"ltjax.ffi unavailable: {lffi.unavailable_reason()}")

# (K, N, tile, sparsity): ragged tiles, one tile column, tiles one row high, 1-word tile columns.
CASES = [
    (300, 70, (16, 64), 0.5),
    (1000, 37, (8, 256), 0.9),
    (77, 45, (256, 256), 0.0),
    (512, 64, (1, 32), 0.5),
    (260, 33, (5, 128), 0.7),
    (96, 130, (7, 32), 1.0),
]


def _weight(seed, k, n, sparsity):
    """`helpers.random_weight`, and the all-zero weight at sparsity 1."""
    return np.zeros((k, n), np.float32) if sparsity == 1.0 else random_weight((k, n), sparsity=sparsity, seed=seed)


def _count(ct) -> np.ndarray:
    """Row starts by brute force over the mask's bits: the tile's offset plus the set bits of the
    tile's rows above, in the row's tile column."""
    (n, k), (tr, tc) = ct.header.storage_shape, ct.tile
    dense = np.unpackbits(np.asarray(ct.mask).view(np.uint8), axis=1, bitorder="little")[:, :k].astype(bool)
    gc = -(-k // tc)
    offsets = np.asarray(ct.offsets)
    out = np.zeros((n, gc), np.int64)
    for r in range(n):
        for j in range(gc):
            t0 = (r // tr) * tr
            out[r, j] = offsets[(r // tr) * gc + j] + dense[t0:r, j * tc:(j + 1) * tc].sum()
    return out.reshape(-1)


@pytest.mark.parametrize("k,n,tile,sparsity", CASES)
@pytest.mark.parametrize("codec", ["bitmask", "bitmask_int8"])
def test_row_starts_match_a_count_over_the_dense_mask(k, n, tile, sparsity, codec):
    ct = pack(_weight(k + n, k, n, sparsity), codec, tile=tile)
    got = ltjax.index_rows(ct)
    assert got.row_starts.dtype == jnp.int32 and got.row_starts.shape == (n * -(-k // ct.tile[1]),)
    np.testing.assert_array_equal(np.asarray(got.row_starts), _count(ct))
    np.testing.assert_array_equal(np.asarray(jax.jit(row_starts)(ct)), _count(ct))  # jittable, per call
    got.validate()


def test_index_rows_walks_a_tree_and_stacks():
    bm = pack(_weight(1, 128, 48, 0.5), "bitmask_int8", tile=(16, 64))
    i8 = pack(_weight(2, 128, 48, 0.0), "int8")
    dense = jnp.ones((3, 4))
    stacked = jax.tree.map(lambda a: jnp.stack([a, a, a]), bm)
    out = ltjax.index_rows({"a": bm, "b": [i8, dense], "c": stacked})
    assert out["b"][0].row_starts is None and out["b"][1] is dense
    assert out["c"].row_starts.shape == (3, 48 * 2) and out["c"].stack_shape == (3,)
    for layer in out["c"].unstack():
        np.testing.assert_array_equal(np.asarray(layer.row_starts), np.asarray(out["a"].row_starts))
    again = ltjax.index_rows(out)
    assert again["a"].row_starts is out["a"].row_starts  # already indexed: kept


def test_the_index_is_not_saved_and_bad_ones_are_refused(tmp_path):
    ct = ltjax.index_rows(pack(_weight(3, 200, 40, 0.6), "bitmask", tile=(8, 64)))
    ltjax.save(tmp_path / "w.lt", {"w": ct})
    back = ltjax.load(tmp_path / "w.lt")["w"]
    assert back.row_starts is None and ct.nbytes == back.nbytes
    np.testing.assert_array_equal(np.asarray(ltjax.index_rows(back).row_starts), np.asarray(ct.row_starts))
    with pytest.raises(ltjax.LTFormatError, match=r"row_starts must be int32 \[160\].*got int32 \[159\]"):
        dataclasses.replace(ct, row_starts=ct.row_starts[:-1]).validate()
    with pytest.raises(ltjax.LTFormatError, match="got int64 .* codec 'int8'"):
        i8 = pack(_weight(4, 64, 40, 0.0), "int8")
        dataclasses.replace(i8, row_starts=np.zeros(40, np.int64)).validate()
    with pytest.raises(ValueError, match="row_starts needs a bitmask codec, got 'int8'"):
        row_starts(i8)


def _xla_primitives(f, *args) -> set[str]:
    """The primitives of ``f``'s forward program outside the Pallas kernels' bodies."""
    names: set[str] = set()

    def walk(jaxpr):
        for e in jaxpr.eqns:
            names.add(e.primitive.name)
            if e.primitive.name == "pallas_call":
                continue
            for v in e.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(f)(*args).jaxpr)
    return names


@needs_ffi
@pytest.mark.parametrize("impl", ["cuda", "pallas", "ffi", "xla", "reference"])
def test_matmul_over_an_indexed_weight(impl):
    """Every path gives the same product over the indexed weight; the CUDA and Pallas paths, the
    ones that read the index, no longer count the mask in XLA (no popcount outside the kernels)."""
    ct = jax.tree.map(jnp.asarray, pack(_weight(5, 320, 70, 0.5), "bitmask_int8", tile=(32, 64)))
    ix = ltjax.index_rows(ct)
    rng = np.random.default_rng(6)
    for m in (1, 5):
        x = jnp.asarray(rng.standard_normal((m, 320)), jnp.float32)
        assert_close(jax.jit(lambda x, c: ltjax.matmul(x, c, impl=impl))(x, ix), ltjax.matmul_reference(x, ct))
    if impl == "cuda":
        f = lambda x, c: ltjax.matmul(x, c, impl=impl)
    elif impl == "pallas":  # row bands: the Pallas kernels that take band starts from XLA
        bs = BlockSizes(block_m=8, block_n=8, block_k=64, split=0, num_stages=1, band_rows=8)
        f = lambda x, c: lp.bitmask_matmul(x, c, interpret=True, block_sizes=bs)
    else:
        return
    assert "population_count" in _xla_primitives(f, x, ct)
    assert "population_count" not in _xla_primitives(f, x, ix)


@needs_ffi
@pytest.mark.parametrize("impl", ["cuda", "ffi", "xla"])
def test_gradients_and_vmap_with_an_index(impl):
    ct = ltjax.index_rows(jax.tree.map(jnp.asarray, pack(_weight(7, 128, 40, 0.5), "bitmask_int8", tile=(16, 64))))
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((2, 128)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 40)), jnp.float32)
    loss = lambda impl: (lambda x, c: jnp.sum(ltjax.matmul(x, c, impl=impl) * g))
    gx, gct = jax.jit(jax.grad(loss(impl), argnums=(0, 1), allow_int=True))(x, ct)
    rx, rct = jax.grad(loss("reference"), argnums=(0, 1), allow_int=True)(x, dataclasses.replace(ct, row_starts=None))
    assert_close(gx, rx)
    assert_close(gct.scales, rct.scales)
    assert gct.row_starts.dtype == jax.dtypes.float0
    stacked = ltjax.index_rows(jax.tree.map(lambda a: jnp.stack([a, a]), dataclasses.replace(ct, row_starts=None)))
    ys = jax.vmap(lambda c: ltjax.matmul(x, c, impl=impl))(stacked)
    assert_close(ys[1], ltjax.matmul_reference(x, ct))


def test_shard_places_the_index_with_the_rows():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    ct = ltjax.index_rows(pack(_weight(9, 64, 32, 0.5), "bitmask_int8", tile=(16, 64)))
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    sh = ltjax.shard(ct, NamedSharding(mesh, P(None, "model")))
    assert sh.row_starts.sharding.spec == P("model")
    np.testing.assert_array_equal(np.asarray(sh.row_starts), np.asarray(ct.row_starts))


def test_the_docstring_example_runs():
    import doctest

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(ltjax.index_rows, "index_rows", globs={}):
        runner.run(test)
    assert runner.summarize(verbose=False).attempted == 4 and runner.failures == 0


def test_nnx_models_are_indexed_in_place():
    from flax import nnx

    class Two(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(128, 64, rngs=rngs), nnx.Linear(64, 40, rngs=rngs)

        def __call__(self, x):
            return self.b(self.a(x))

    model = Two(nnx.Rngs(0))
    ltjax.nnx.compress_model(model, ltjax.Policy(codec="bitmask_int8", min_size=0))
    x = jnp.asarray(np.random.default_rng(10).standard_normal((3, 128)), jnp.float32)
    want = model(x)
    assert ltjax.nnx.index_rows(model) is model
    for layer, rows in ((model.a, 64), (model.b, 40)):
        ct = layer.kernel.get_value()
        assert ct.row_starts is not None and ct.row_starts.shape == (rows,)
        np.testing.assert_array_equal(np.asarray(ct.row_starts), _count(ct))
    assert_close(model(x), want)
