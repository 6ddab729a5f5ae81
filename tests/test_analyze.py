"""The analyzer, `compress` with codec choice, `Policy` and `compress_tree`."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import ltjax
from ltjax._format import pack


def _w(shape, sparsity=0.0, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < sparsity] = 0
    return x.astype(dtype)


def test_stats_are_measured():
    x = _w((256, 512), 0.6)
    x[3, 7] = 50.0  # an outlier
    s = ltjax.analyze(x).tensors[0]
    assert s.zeros == pytest.approx(np.mean(x == 0))
    assert s.max == pytest.approx(50.0) and s.absmax == pytest.approx(50.0)
    assert s.min == pytest.approx(float(x.min()))
    assert s.outliers == pytest.approx(np.mean(np.abs(x) > 6 * np.sqrt(np.mean(x.astype(np.float64) ** 2))))
    for e in s.codecs:
        ct = pack(x, e.codec)
        assert e.nbytes == ct.nbytes  # exact, not an estimate
        y = np.asarray(ltjax.decompress(ct), np.float64)
        err = np.linalg.norm(y - x) / np.linalg.norm(x.astype(np.float64))
        assert e.rel_error == pytest.approx(err, rel=1e-6, abs=1e-12)


def test_auto_picks_smallest_within_budget():
    dense = _w((128, 256), 0.0)
    sparse = _w((128, 256), 0.8)
    assert ltjax.compress(dense).codec == "raw"  # lossless, nothing saves space
    assert ltjax.compress(sparse).codec == "bitmask"  # lossless
    assert ltjax.compress(dense, error_budget=0.05).codec == "int8"
    assert ltjax.compress(sparse, error_budget=0.05).codec == "bitmask_int8"
    assert ltjax.compress(dense, error_budget=1e-6).codec == "raw"  # int8 error is ~5e-3
    assert ltjax.compress(sparse, error_budget=0.05, codecs=("raw", "int8")).codec == "int8"


def test_report_table_and_json():
    tree = {"a": {"kernel": _w((64, 128), 0.5)}, "b": np.arange(10)}
    r = ltjax.analyze(tree, error_budget=0.01)
    text = str(r)
    assert "a/kernel" in text and "bitmask_int8" in text and "skipped b" in text
    d = json.loads(r.to_json())
    assert d["tensors"][0]["name"] == "a/kernel" and len(d["tensors"][0]["codecs"]) == 4


def test_compress_tree_policy_and_report():
    tree = {
        "enc": {"kernel": _w((128, 64)), "bias": _w((64,))},
        "dec": {"kernel": _w((64, 128), 0.9), "embedding": _w((300, 32))},
        "small": _w((8, 8)),
        "ints": np.arange(5000),
    }
    out, rep = ltjax.compress_tree(
        tree, ltjax.Policy(codec="int8", min_size=1000, skip=("dec/kernel", "no/such/*")), return_report=True
    )
    assert isinstance(out["enc"]["kernel"], ltjax.CompressedTensor) and out["enc"]["kernel"].codec == "int8"
    assert out["dec"]["kernel"] is tree["dec"]["kernel"]  # skipped
    assert out["small"] is tree["small"] and out["enc"]["bias"] is tree["enc"]["bias"]
    assert out["ints"] is tree["ints"]
    emb = out["dec"]["embedding"]
    assert emb.header.axis == 0 and emb.scales.shape == (300,)  # embeddings: one scale per row
    assert rep.unmatched_skip == ("no/such/*",)
    assert "no/such/*" in str(rep)
    dense_total = sum(np.asarray(l).nbytes for l in [tree["enc"]["kernel"], tree["enc"]["bias"], tree["dec"]["kernel"], tree["dec"]["embedding"], tree["small"], tree["ints"]])
    assert rep.dense_nbytes == dense_total
    assert rep.nbytes == sum(l.nbytes for l in rep.leaves) < dense_total
    notes = {l.path: l.reason for l in rep.leaves}
    assert "skipped by pattern" in notes["dec/kernel"] and "min_size" in notes["small"]


def test_compress_tree_auto_lossless_keeps_dense_when_nothing_saves():
    tree = {"d": _w((128, 128)), "s": _w((128, 128), 0.7)}
    out, rep = ltjax.compress_tree(tree, ltjax.Policy(min_size=1), return_report=True)
    assert out["d"] is tree["d"]
    assert out["s"].codec == "bitmask"
    np.testing.assert_array_equal(np.asarray(ltjax.decompress(out["s"])), tree["s"])


def test_nan_and_inf_are_named():
    x = _w((64, 64))
    x[1, 2], x[3, 4], x[5, 6] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match=r"'layer/w' has 3 non-finite values \(1 NaN, 2 Inf\)"):
        ltjax.compress(x, "int8", name="layer/w")
    with pytest.raises(ValueError, match="'bad/kernel' has 3 non-finite"):
        ltjax.compress_tree({"bad": {"kernel": x}}, ltjax.Policy(min_size=1))
    with pytest.raises(ValueError, match="non-finite"):
        ltjax.analyze(x)


def test_unsupported_dtype_and_codec():
    with pytest.raises(ValueError, match="unsupported dtype float64"):
        ltjax.compress(np.ones((4, 4)), "int8")
    with pytest.raises(ValueError, match="unsupported dtype int32"):
        ltjax.compress(np.ones((4, 4), np.int32))
    with pytest.raises(ValueError, match="is not a codec"):
        ltjax.compress(_w((4, 4)), "int4")
    with pytest.raises(ValueError, match="Policy codec"):
        ltjax.Policy(codec="zip")
    with pytest.raises(ValueError, match="empty"):
        ltjax.compress(np.zeros((0, 4), np.float32), "int8")


def test_tile_that_cannot_fit():
    with pytest.raises(ValueError, match="cannot fit"):
        ltjax.compress(_w((64, 100)), "bitmask", tile=(8, 40))
    with pytest.raises(ValueError, match="cannot fit"):
        ltjax.compress(_w((64, 100)), "int8", tile=(0, 32))
    with pytest.raises(ValueError, match="cannot fit"):
        ltjax.compress(_w((64, 100)), "int8", tile=8)
    ct = ltjax.compress(_w((64, 100)), "bitmask", tile=(8, 64))
    assert ct.tile == (8, 64)


def test_bf16_and_jax_inputs():
    x = jnp.asarray(_w((64, 64), 0.5)).astype(jnp.bfloat16)
    ct = ltjax.compress(x, "bitmask")
    assert ct.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(ltjax.decompress(ct)).view(np.uint16), np.asarray(x).view(np.uint16))
