"""The LT-Block format: codecs, geometry, sizes, checksums, the reference decoder."""

import dataclasses
import math
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ltjax
from ltjax._format import DTYPES, decompress_reference, pack, tile_checksums, verify_checksums

DTYPE_LIST = [np.float32, np.float16, ml_dtypes.bfloat16]
INT8_REL_ERR = 0.02  # symmetric per-channel int8 on Gaussian data: ~0.5-1%; bf16 output rounding adds ~0.3%


# Codecs that take any shape and tile (int4 needs its groups to divide the rows: tests/test_int4.py).
ANY_SHAPE_CODECS = [c for c in ltjax.CODECS if c != "int4"]

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
    codec=st.sampled_from(ANY_SHAPE_CODECS),
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
@pytest.mark.parametrize("codec", ANY_SHAPE_CODECS)
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
    for codec in ANY_SHAPE_CODECS:
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
    for codec in ANY_SHAPE_CODECS:
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
    for codec in ANY_SHAPE_CODECS:
        ct = pack(x, codec)
        assert ct.header.dtype == dtype and ct.dtype == x.dtype
        assert np.asarray(ltjax.decompress(ct)).dtype == x.dtype


# ---------------------------------------------------------------------- validate(): what the arrays hold
def _damaged(ct, **arrays):
    """``ct`` with some arrays replaced (host copies), as a user's own code might build it."""
    return ltjax.CompressedTensor(header=ct.header, **{**{k: np.asarray(v) for k, v in ct.arrays().items()}, **arrays})


def _tile_nonzeros(x2, tile):
    """Nonzero count of each tile of a storage matrix, row-major over the tile grid (a plain loop)."""
    (c, r), (tr, tc) = x2.shape, tile
    return [int(np.count_nonzero(x2[i:i + tr, j:j + tc])) for i in range(0, c, tr) for j in range(0, r, tc)]


@pytest.mark.parametrize("codec", ["bitmask", "bitmask_int8"])
def test_validate_catches_a_quarter_of_the_packed_entries(codec):
    w = _random(np.random.default_rng(101), (192, 160), np.float32, 0.5)
    ct = pack(w, codec, tile=(64, 64))
    ct.validate(checksums=True)
    field = "values" if codec == "bitmask" else "codes"
    nnz = int(np.count_nonzero(w))
    bad = _damaged(ct, **{field: np.asarray(getattr(ct, field))[: nnz // 4]})
    want = rf"tensor 'w'.*packed {field} hold {nnz // 4} entries but the mask has {nnz} set bits"
    with pytest.raises(ltjax.LTFormatError, match=want):
        bad.validate(name="w")


def test_validate_catches_shifted_offsets():
    w = _random(np.random.default_rng(102), (128, 320), np.float32, 0.6)
    ct = pack(w, "bitmask_int8", tile=(32, 64))  # storage [320, 128]: 10 x 2 tiles
    counts = _tile_nonzeros(w.T, (32, 64))
    offsets = np.asarray(ct.offsets)
    with pytest.raises(ltjax.LTFormatError, match=r"offsets\[0\] \(tile 0 of 20\) = 5, expected 0"):
        _damaged(ct, offsets=offsets + 5).validate()
    late = np.concatenate([[0], offsets[:-1]]).astype(np.int32)  # every offset one tile late
    with pytest.raises(ltjax.LTFormatError, match=rf"offsets\[1\] \(tile 1 of 20\) = 0, expected {counts[0]}"):
        _damaged(ct, offsets=late).validate()


def test_validate_catches_an_all_ones_mask():
    w = _random(np.random.default_rng(103), (256, 96), np.float32, 0.7)
    ct = pack(w, "bitmask_int8", tile=(32, 128))  # storage [96, 256]: whole mask words
    ones = np.full_like(np.asarray(ct.mask), 0xFFFFFFFF)
    first = _tile_nonzeros(w.T, (32, 128))[0]
    with pytest.raises(ltjax.LTFormatError, match=rf"offsets\[1\] \(tile 1 of 6\) = {first}, expected {32 * 128}"):
        _damaged(ct, mask=ones).validate()
    # rows of 100 columns: the padding bits of the last word are set first
    ct = pack(_random(np.random.default_rng(104), (100, 64), np.float32, 0.5), "bitmask", tile=(16, 100))
    with pytest.raises(ltjax.LTFormatError, match=r"mask row 0 has bits set beyond its 100 columns.*64 row\(s\)"):
        _damaged(ct, mask=np.full_like(np.asarray(ct.mask), 0xFFFFFFFF)).validate()


@pytest.mark.parametrize("codec", ANY_SHAPE_CODECS)
def test_validate_with_checksums_pins_a_flipped_payload_byte(codec):
    rng = np.random.default_rng(105)
    w = _random(rng, (96, 200), np.float32, 0.5)
    ct = pack(w, codec, tile=(32, 64))  # storage [200, 96]: 7 x 2 tiles
    field = {"raw": "values", "int8": "codes", "bitmask": "values", "bitmask_int8": "codes"}[codec]
    arr = np.array(getattr(ct, field))
    flat = arr.reshape(-1)
    i = int(rng.integers(flat.size))
    if arr.dtype == np.int8:
        while flat[i] in (-127, -126, 0):  # keep the flipped code a valid int8 code (not -128)
            i = int(rng.integers(flat.size))
        flat[i] ^= 1
    else:
        flat.view(np.uint8)[4 * i] ^= 0x10
    if codec in ("raw", "int8"):  # storage [200, 96], row-major: element i is in row i // 96
        row, col = divmod(i, 96)
        tile = (row // 32) * 2 + col // 64
    else:  # packed tile by tile: the tile whose offset range holds i
        tile = int(np.searchsorted(np.asarray(ct.offsets), i, side="right") - 1)
    bad = _damaged(ct, **{field: arr})
    bad.validate()  # what the arrays hold is consistent: only the checksum tells
    with pytest.raises(ltjax.ChecksumError, match=rf"tensor 'layer/w': checksum mismatch in tile {tile} of 14") as e:
        bad.validate(checksums=True, name="layer/w")
    assert e.value.tensor == "layer/w" and e.value.tile == tile


def test_validate_catches_bad_scales_and_codes():
    w = _random(np.random.default_rng(106), (64, 48), np.float32, 0.3)
    for codec in ("int8", "bitmask_int8"):
        ct = pack(w, codec)
        scales = np.array(ct.scales)
        scales[5] = np.nan
        with pytest.raises(ltjax.LTFormatError, match=r"scales\[5\] = nan is not finite"):
            _damaged(ct, scales=scales).validate()
        codes = np.array(ct.codes)
        codes.reshape(-1)[7] = -128
        with pytest.raises(ltjax.LTFormatError, match="= -128; int8 codes are symmetric"):
            _damaged(ct, codes=codes).validate()


def test_validate_catches_a_stale_row_index():
    # storage [64, 128] in 16 x 64 tiles: two tile columns per row, so entry 9 is row 4, tile column 1
    w = _random(np.random.default_rng(107), (128, 64), np.float32, 0.5)
    ct = ltjax.index_rows(pack(w, "bitmask_int8", tile=(16, 64)))
    ct.validate()
    rs = np.array(ct.row_starts)
    rs[9] += 1
    with pytest.raises(ltjax.LTFormatError, match=r"row_starts\[9\] \(row 4, tile column 1\).*stale index"):
        dataclasses.replace(ct, row_starts=rs).validate()


def _stack(cts):
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *cts)


def test_validate_stacked_names_the_layer():
    rng = np.random.default_rng(108)
    w = _random(rng, (128, 96), np.float32, 0.5)
    layers = [w, w[rng.permutation(128)], w[:, rng.permutation(96)]]  # same nonzero count, other tiles
    st = _stack([pack(l, "bitmask_int8", tile=(32, 64)) for l in layers])
    assert st.stack_shape == (3,)
    st.validate(checksums=True)
    offsets = np.array(st.offsets)
    offsets[2, 3] += 1
    with pytest.raises(ltjax.LTFormatError, match=r"tensor 'blocks/w' \(layer 2 of the stack \(3,\)\): offsets\[3\]"):
        _damaged(st, offsets=offsets).validate(name="blocks/w")
    mask = np.array(st.mask)
    mask[1] = 0xFFFFFFFF
    with pytest.raises(ltjax.LTFormatError, match=rf"\(layer 1 of the stack \(3,\)\): offsets\[1\] \(tile 1 of 6\) = "
                                                 rf"{_tile_nonzeros(layers[1].T, (32, 64))[0]}, expected {32 * 64}"):
        _damaged(st, mask=mask).validate()
    scales = np.array(st.scales)
    scales[2, 17] = np.inf
    with pytest.raises(ltjax.LTFormatError, match=r"layer 2 .*scales\[17\] = inf"):
        _damaged(st, scales=scales).validate()
    codes = np.array(st.codes)
    codes[1, 11] ^= 2
    with pytest.raises(ltjax.ChecksumError, match=r"tensor 'blocks/w\[1\]': checksum mismatch"):
        _damaged(st, codes=codes).validate(checksums=True, name="blocks/w")


def test_validate_on_traced_arrays_says_so():
    ct = pack(_random(np.random.default_rng(109), (64, 64), np.float32, 0.5), "bitmask_int8")
    jax.jit(lambda c: c.validate and ltjax.decompress(c))(ct)  # tracing a tensor is fine
    with pytest.raises(ValueError,
                       match="arrays are traced.*call validate\\(\\) on the concrete tensor before tracing"):
        jax.jit(lambda c: c.validate())(ct)
    bad = dataclasses.replace(ct, offsets=np.asarray(ct.offsets)[:-1])
    with pytest.raises(ltjax.LTFormatError, match="array 'offsets'"):  # shapes are checked under tracing too
        jax.jit(lambda c: c.validate())(bad)


@pytest.mark.parametrize("codec", ANY_SHAPE_CODECS)
def test_intact_tensors_from_compress_load_and_shard_pass(codec, tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    rng = np.random.default_rng(110)
    cases = [((96, 200), np.float32, (32, 64)), ((100, 70), np.float16, None),
             ((6, 50, 33), ml_dtypes.bfloat16, (8, 32)), ((257,), np.float32, 64), ((64, 64), np.float32, None)]
    tree = {}
    for i, (shape, dtype, tile) in enumerate(cases):
        ct = ltjax.compress(_random(rng, shape, dtype, [0.0, 0.5, 0.9, 1.0, 0.3][i]), codec, tile=tile)
        ct.validate(checksums=True, name=f"t{i}")
        tree[f"t{i}"] = ct
    tree["idx"] = ltjax.index_rows(tree["t0"]) if codec.startswith("bitmask") else tree["t0"]
    tree["idx"].validate(checksums=True)
    tree["stack"] = _stack([tree["t4"], ltjax.compress(_random(rng, (64, 64), np.float32, 0.0), codec)]) \
        if codec in ("raw", "int8") else tree["t4"]
    ltjax.save(tmp_path / "m.lt", tree)
    for name, ct in ltjax.load(tmp_path / "m.lt").items():
        ct.validate(checksums=True, name=name)
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    ltjax.shard(tree["t4"], NamedSharding(mesh, P(None, "model"))).validate(checksums=True)


def test_damaged_tensors_are_refused_by_save_and_shard(tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    w = _random(np.random.default_rng(111), (128, 64), np.float32, 0.5)
    ct = pack(w, "bitmask_int8", tile=(16, 128))
    bad = _damaged(ct, offsets=np.asarray(ct.offsets) + 3)
    p = tmp_path / "m.lt"
    ltjax.save(p, {"w": ct})
    before = p.read_bytes()
    with pytest.raises(ltjax.LTFormatError, match=r"tensor 'w': offsets\[0\]"):
        ltjax.save(p, {"w": bad})
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["m.lt"]  # the target and the tree are untouched
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    with pytest.raises(ltjax.LTFormatError, match=r"'ltjax.shard input': offsets\[0\]"):
        ltjax.shard(bad, NamedSharding(mesh, P(None, "model")))


@pytest.mark.parametrize("codec", ["raw", "int8", "bitmask", "bitmask_int8", "int4"])
def test_host_arrays_are_aligned_so_jit_reads_them_in_place(codec):
    """compress() returns numpy leaves that a jitted call reads without a copy (64-byte aligned)."""
    rng = np.random.default_rng()
    w = rng.standard_normal((128, 96)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0
    ct = ltjax.compress(w, codec)
    for name, a in ct.leaves().items():
        assert isinstance(a, np.ndarray) and a.ctypes.data % 64 == 0, name
        assert jax.device_put(a).unsafe_buffer_pointer() == a.ctypes.data, name  # aliased, not copied
    # A tensor built from misaligned arrays holds aligned copies of the same contents.
    leaves = {}
    for name, a in ct.arrays().items():
        buf = np.empty(a.nbytes + 72, np.uint8)
        start = (-buf.ctypes.data % 64) + 8
        leaves[name] = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
        leaves[name][...] = a
        assert leaves[name].ctypes.data % 64 == 8
    moved = dataclasses.replace(ct, **leaves)
    for name, a in moved.arrays().items():
        assert a.ctypes.data % 64 == 0 and np.array_equal(a, leaves[name]), name
    np.testing.assert_array_equal(np.asarray(ltjax.decompress(moved)), np.asarray(ltjax.decompress(ct)))
