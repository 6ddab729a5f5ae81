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
    assert d["tensors"][0]["name"] == "a/kernel" and len(d["tensors"][0]["codecs"]) == len(ltjax.CODECS)


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
    dense_total = sum(np.asarray(l).nbytes for l in [tree["enc"]["kernel"], tree["enc"]["bias"], tree["dec"]["kernel"],
                                                     tree["dec"]["embedding"], tree["small"], tree["ints"]])
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
        ltjax.compress(_w((4, 4)), "int2")
    with pytest.raises(ValueError, match=r"int4 needs the reduction axis .* multiple of group=64"):
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


# ---------------------------------------------------------------------- naming only lossy codecs means "use them"
def _int8_reference(w):
    """Symmetric per-output-channel int8 of a [K, N] kernel, in plain numpy: (decoded, rel err, bytes)."""
    w64 = w.astype(np.float64)
    s = np.abs(w64).max(axis=0) / 127.0
    dec = np.clip(np.rint(w64 / np.where(s > 0, s, 1.0)), -127, 127) * s
    k, n = w.shape
    tiles = -(-n // max(1, 65536 // min(k, 256))) * -(-k // min(k, 256))
    return dec, np.linalg.norm(dec - w64) / np.linalg.norm(w64), k * n + 4 * n + 4 * tiles


def test_lossy_codecs_named_without_a_budget_are_used():
    rng = np.random.default_rng(201)
    w = rng.standard_normal((384, 256)).astype(np.float32)
    dec, err, nbytes = _int8_reference(w)
    for policy in (ltjax.Policy(codecs=("int8",)), ltjax.Policy(codecs=("raw", "int8")), ltjax.Policy(codecs="int8")):
        assert policy.error_budget == float("inf") and policy.codecs[-1] == "int8"
        out, rep = ltjax.compress_tree({"layer": {"kernel": w}}, policy, return_report=True)
        ct = out["layer"]["kernel"]
        assert ct.codec == "int8" and ct.nbytes == nbytes
        np.testing.assert_allclose(np.asarray(ltjax.decompress(ct), np.float64), dec, rtol=1e-6, atol=1e-7)
        assert rep.leaves[0].codec == "int8" and rep.leaves[0].rel_error == pytest.approx(err, rel=1e-5)
    assert ltjax.compress(w, "auto", codecs=("int8",)).codec == "int8"
    sparse = np.where(rng.random(w.shape) < 0.6, 0.0, w).astype(np.float32)
    assert ltjax.compress(sparse, codecs=("raw", "int8", "bitmask_int8")).codec == "bitmask_int8"
    assert ltjax.compress(sparse, codecs=("int8", "bitmask")).codec == "bitmask"  # a lossless codec named: lossless
    assert ltjax.Policy(codecs=("int8", "bitmask")).error_budget is None
    assert ltjax.compress(w, codecs=("int8",), error_budget=1e-6).codec == "raw"  # an explicit budget holds
    # the stacked layers of compress_params follow the same rule
    st = np.stack([w, rng.standard_normal((384, 256)).astype(np.float32)])
    tree = ltjax.nn.compress_params({"blocks": {"kernel": st}, "head": {"kernel": w}}, ltjax.Policy(codecs=("int8",)),
                                    stacked="blocks/*")
    assert tree["blocks"]["kernel"].codec == "int8" and tree["head"]["kernel"].codec == "int8"


def test_the_report_gives_the_true_reason_a_leaf_stays_dense():
    rng = np.random.default_rng(202)
    w = rng.standard_normal((384, 256)).astype(np.float32)
    _, err, nbytes = _int8_reference(w)
    ratio = w.nbytes / nbytes
    _, rep = ltjax.compress_tree({"w": w}, return_report=True)  # lossless by default: int4 is the smallest excluded
    assert rep.leaves[0].codec == "dense" and rep.leaves[0].reason.startswith("int4 would save 7.5")
    _, rep = ltjax.compress_tree({"w": w}, ltjax.Policy(codecs=("raw", "int8", "bitmask")), return_report=True)
    assert rep.leaves[0].reason == (f"int8 would save {ratio:.2f}x at rel err {err:.1e} > error_budget 0 (lossless by "
                                    "default): set error_budget= or codec='int8'")
    _, rep = ltjax.compress_tree({"w": w}, ltjax.Policy(codecs=("int8",), error_budget=1e-4), return_report=True)
    assert rep.leaves[0].reason.startswith(f"int8 would save {ratio:.2f}x at rel err {err:.1e} > error_budget 0.0001:")
    sparse = np.where(rng.random(w.shape) < 0.5, 0.0, w).astype(np.float32)
    _, rep = ltjax.compress_tree({"s": sparse}, ltjax.Policy(codecs=("int8", "bitmask_int8"), error_budget=1e-4),
                                 return_report=True)
    assert rep.leaves[0].reason.startswith("bitmask_int8 would save")  # the smallest of those the budget excluded
    _, rep = ltjax.compress_tree({"w": w}, ltjax.Policy(codecs=("raw", "bitmask")), return_report=True)
    assert rep.leaves[0].reason.startswith("no allowed codec saves space (bitmask 0.")  # true: bitmask grows it
    _, rep = ltjax.compress_tree({"w": w}, ltjax.Policy(codecs=("raw",)), return_report=True)
    assert rep.leaves[0].reason == "codecs=('raw',) allow no compressing codec"


def test_bad_budgets_and_codecs_are_named():
    for bad in (-0.1, float("nan"), "0.1"):
        with pytest.raises(ValueError, match=r"Policy error_budget=.* must be >= 0"):
            ltjax.Policy(error_budget=bad)
        with pytest.raises(ValueError, match=r"error_budget=.* must be >= 0"):
            ltjax.compress(_w((64, 64)), error_budget=bad)
    with pytest.raises(ValueError, match=r"codecs=\('int2',\) has unknown codecs \['int2'\]"):
        ltjax.compress(_w((64, 64)), codecs="int2")
    with pytest.raises(ValueError, match=r"Policy codecs=\('int8', 'zip'\) has unknown codecs \['zip'\]"):
        ltjax.Policy(codecs=["int8", "zip"])
