"""The LT-Block format: codecs, geometry, sizes, checksums, the reference decoder."""

import math

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ltjax
from ltjax._format import DTYPES, decompress_reference, pack, tile_checksums, verify_checksums

DTYPE_LIST = [np.float32, np.float16, ml_dtypes.bfloat16]
INT8_REL_ERR = 0.02  # symmetric per-channel int8 on Gaussian data: ~0.5-1%; bf16 output rounding adds ~0.3%


def _random(rng, shape, dtype, sparsity):
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < sparsity] = 0.0
    return x.astype(dtype)


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _rel_err(x, y):
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.linalg.norm(y64 - x64) / max(np.linalg.norm(x64), 1e-30)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=4).filter(lambda s: math.prod(s) <= 20000),
    dtype=st.sampled_from(DTYPE_LIST),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
    codec=st.sampled_from(ltjax.CODECS),
    tile=st.sampled_from([None, 32, 100, (1, 32), (3, 64), (17, 96), (1000, 1000)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(shape, dtype, sparsity, codec, tile, seed):
    x = _random(np.random.default_rng(seed), tuple(shape), dtype, sparsity)
    rows = x.size // (x.shape[-1] if x.ndim >= 2 else 1)  # R of the [C, R] storage matrix
    if isinstance(tile, tuple) and tile[1] < rows and tile[1] % 32:
        with pytest.raises(ValueError, match="cannot fit"):  # mask words would straddle tiles
            pack(x, codec, tile=tile)
        return
    ct = pack(x, codec, tile=tile)
    ct.validate()
    verify_checksums(ct)
    y = np.asarray(decompress_reference(ct))
    assert y.shape == x.shape and y.dtype == x.dtype
    if codec in ("raw", "bitmask"):
        np.testing.assert_array_equal(_bits(y), _bits(x))  # bit-exact, -0.0 included
    else:
        assert _rel_err(x, y) <= INT8_REL_ERR
        # equal to codes x scale, computed independently in numpy
        xs = np.moveaxis(x, -1, 0).reshape(x.shape[-1], -1) if x.ndim >= 2 else x.reshape(1, -1)
        xf = xs.astype(np.float32)
        s = np.abs(xf).max(1) / 127
        q = np.clip(np.rint(xf / np.where(s > 0, s, 1)[:, None]), -127, 127)
        want = (q * s[:, None]).astype(x.dtype)
        got = np.moveaxis(y, -1, 0).reshape(xs.shape) if y.ndim >= 2 else y.reshape(1, -1)
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
        # zeros stay exactly zero in both int8 codecs
        assert np.all(got[xs == 0] == 0)


@pytest.mark.parametrize("shape", [(1, 1), (7,), (997,), (13, 17), (3, 5, 7, 11), (521, 263)])
@pytest.mark.parametrize("codec", ltjax.CODECS)
def test_odd_shapes(shape, codec):
    x = _random(np.random.default_rng(1), shape, np.float32, 0.5)
    y = np.asarray(ltjax.decompress(pack(x, codec)))
    if codec in ("raw", "bitmask"):
        np.testing.assert_array_equal(y, x)
    else:
        assert _rel_err(x, y) <= INT8_REL_ERR


def test_negative_zero_survives_bitmask():
    x = np.array([[0.0, -0.0, 1.5, -0.0]], np.float32)
    y = np.asarray(decompress_reference(pack(x, "bitmask")))
    np.testing.assert_array_equal(_bits(y), _bits(x))


def test_decode_is_jittable_and_channel_axis():
    rng = np.random.default_rng(2)
    x = _random(rng, (40, 6, 9), np.float32, 0.4)
    for axis in (0, 1, 2, None):
        ct = pack(x, "int8", axis=axis, tile=64)
        y = jax.jit(ltjax.decompress)(ct)
        assert _rel_err(x, y) <= INT8_REL_ERR
        assert ct.scales.shape == ((1,) if axis is None else (x.shape[axis],))


def test_transpose_is_free():
    x = _random(np.random.default_rng(3), (50, 70), np.float32, 0.5)
    for codec in ltjax.CODECS:
        ct = pack(x, codec, axis=0)
        np.testing.assert_array_equal(np.asarray(ltjax.decompress(ct.T)), np.asarray(ltjax.decompress(ct)).T)
        assert ct.T.header.storage_shape == ct.header.storage_shape


def test_offsets_are_exclusive_prefix_sums():
    x = _random(np.random.default_rng(4), (300, 200), np.float32, 0.6)
    ct = pack(x, "bitmask", tile=(64, 96))
    xs = x.T  # storage [C=200, R=300]
    counts = []
    for i in range(0, 200, 64):
        for j in range(0, 300, 96):
            counts.append(int(np.count_nonzero(xs[i : i + 64, j : j + 96])))
    np.testing.assert_array_equal(np.asarray(ct.offsets), np.cumsum(counts) - np.array(counts))
    assert ct.nnz == sum(counts)


def test_sizes_match_the_format_arithmetic():
    """4096x4096 f32, 50% zeros: each codec's nbytes within 1% of what the format implies."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4096, 4096), dtype=np.float32)
    x[rng.random(x.shape) < 0.5] = 0
    n, nnz = x.size, int(np.count_nonzero(x))
    tiles = (4096 // 256) ** 2
    implied = {
        "raw": 4 * n + 4 * tiles,
        "int8": n + 4 * 4096 + 4 * tiles,
        "bitmask": n / 8 + 4 * nnz + 8 * tiles,
        "bitmask_int8": n / 8 + nnz + 4 * 4096 + 8 * tiles,
    }
    dense = 4 * n
    for codec, want in implied.items():
        ct = pack(x, codec)
        assert abs(ct.nbytes - want) / want < 0.01, (codec, ct.nbytes, want)
        assert ct.dense_nbytes == dense
    assert abs(pack(x, "int8").ratio - 4.0) / 4.0 < 0.01
    assert abs(pack(x, "bitmask").ratio - 1 / (0.5 + 1 / 32)) / (1 / (0.5 + 1 / 32)) < 0.01


def test_nbytes_counts_every_array():
    ct = pack(_random(np.random.default_rng(6), (64, 96), np.float16, 0.5), "bitmask_int8")
    assert ct.nbytes == sum(np.asarray(a).nbytes for a in ct.arrays().values())
    assert set(ct.arrays()) == {"mask", "codes", "scales", "offsets", "checksums"}


def test_pytree_leaves_and_static_header():
    ct = pack(_random(np.random.default_rng(7), (32, 64), np.float32, 0.5), "bitmask_int8")
    leaves, treedef = jax.tree_util.tree_flatten(ct)
    assert len(leaves) == 5
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.header == ct.header
    hash(ct.header)


def test_checksum_pins_the_damaged_tile():
    x = _random(np.random.default_rng(8), (100, 300), np.float32, 0.5)
    for codec in ltjax.CODECS:
        ct = pack(x, codec, tile=(32, 64))
        field = {"raw": "values", "int8": "codes", "bitmask": "values", "bitmask_int8": "codes"}[codec]
        arr = np.array(getattr(ct, field))
        flat = arr.reshape(-1).view(np.uint8)
        flat[flat.size // 2] ^= 0x04
        bad = ltjax.CompressedTensor(header=ct.header, **{**ct.arrays(), field: arr})
        with pytest.raises(ltjax.ChecksumError) as e:
            verify_checksums(bad, name="w")
        assert e.value.tensor == "w" and e.value.tile is not None
        assert "tile" in str(e.value)
        got = tile_checksums(ct.header, {k: np.asarray(v) for k, v in bad.arrays().items()})
        assert int((got != np.asarray(ct.checksums)).sum()) == 1


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dtypes(dtype):
    x = _random(np.random.default_rng(10), (33, 65), DTYPES[dtype], 0.5)
    for codec in ltjax.CODECS:
        ct = pack(x, codec)
        assert ct.header.dtype == dtype and ct.dtype == x.dtype
        assert np.asarray(ltjax.decompress(ct)).dtype == x.dtype
