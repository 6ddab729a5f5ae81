"""Pallas kernels against the jnp reference: natively on GPU, in interpret mode on CPU.

``LTJAX_PALLAS_INTERPRET`` picks the mode ("1" default off-GPU; the GPU check sets "0").
Shapes are small and ragged (K, N not multiples of any block) to keep interpret grids cheap.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, make_ct, rand, random_weight

import ltjax
from ltjax import pallas as lp
from ltjax._config import settings
from ltjax._format import decode_storage, decompress_reference, pack
from ltjax.pallas import BlockSizes
from ltjax.pallas._config import fit_block_m

INTERPRET = lp.resolve_interpret(None)


def _ref(x, ct, transpose=False):
    """``x @ W`` (``transpose``: ``x @ W.T``, what `matmul_t` computes) by the reference."""
    return ltjax.matmul_reference(x, ct.T if transpose else ct)


# ------------------------------------------------------------------ fused matmul, both directions
# Values and gradients through ltjax.matmul(impl="pallas") on every codec: tests/ops/test_matmul.py.
# Here: what only the kernels have (block geometries, row chunks and bands, the f32-as-bf16 rows).

# Block geometries that exercise the other code paths: several column chunks per tile
# (block_k < tile_cols), a split of the reduced axis (partials summed in XLA), M blocks.
BLOCKS = [
    BlockSizes(block_m=1, block_n=8, block_k=32, split=2),
    BlockSizes(block_m=16, block_n=16, block_k=64, split=0),
    BlockSizes(block_m=2, block_n=32, block_k=128, split=1),
    BlockSizes(block_m=1, block_n=16, block_k=64, split=3),  # batch 1: one reduction after the loop
    BlockSizes(block_m=16, block_n=16, block_k=32, split=2, swap_ab=True),  # the weight as the MMA's A
]


@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("codec", ["int8", "bitmask_int8"])
@pytest.mark.parametrize("bs", BLOCKS, ids=lambda b: f"m{b.block_m}n{b.block_n}k{b.block_k}s{b.split}"
                         + ("swap" if b.swap_ab else ""))
def test_block_geometries(codec, bs, xdtype):
    k, n, m = 200, 45, 3
    ct = make_ct(codec, k, n, tile=(20, 128), sparsity=0.7, seed=7)
    x, dy = rand((m, k), xdtype, seed=8), rand((m, n), xdtype, seed=9)
    assert_close(lp.matmul(x, ct, interpret=INTERPRET, block_sizes=bs), _ref(x, ct))
    assert_close(lp.matmul_t(dy, ct, interpret=INTERPRET, block_sizes=bs), _ref(dy, ct, True))


@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("codec", ["bitmask", "bitmask_int8"])
@pytest.mark.parametrize("block_m", [1, 16])
@pytest.mark.parametrize("stages", [1, 2])  # 2: the software-pipelined walk
def test_bitmask_matmul_row_chunks_in_one_tile(codec, block_m, stages, xdtype):
    """A tile row in one chunk, many row chunks per tile, ragged tiles at the row and column ends;
    forward (one tile per program) and transposed."""
    k, n, m = 90, 131, 3
    ct = make_ct(codec, k, n, tile=(37, 64), seed=75)  # storage [131, 90]: tiles 37 x 64, the last 20 x 26
    x = rand((m, k), xdtype, seed=76)
    bs = BlockSizes(block_m=block_m, block_n=8, block_k=64, split=0, num_stages=stages)
    assert_close(lp.bitmask_matmul(x, ct, interpret=INTERPRET, block_sizes=bs), _ref(x, ct))
    dy = rand((m, n), xdtype, seed=77)  # transposed: one tile column per program, its tile rows in turn (split 0 and 2)
    for split in (0, 2):
        bs_t = dataclasses.replace(bs, split=split)
        assert_close(lp.bitmask_matmul_t(dy, ct, interpret=INTERPRET, block_sizes=bs_t), _ref(dy, ct, True))


def _band_starts_numpy(ct, band_rows):
    """Index in the packed array of each row band's first value, counted element by element in the
    format's packed order (tiles row-major, row-major inside a tile) from the mask bits."""
    (n, k), (tr, tc) = ct.header.storage_shape, ct.header.tile
    nz = np.unpackbits(np.asarray(ct.mask).view(np.uint8), axis=1, bitorder="little")[:, :k].astype(bool)
    starts, seen = {}, 0
    for i0 in range(0, n, tr):
        for j0 in range(0, k, tc):
            for r in range(i0, min(i0 + tr, n)):
                if (r - i0) % band_rows == 0:
                    starts[(r // band_rows, j0 // tc)] = seen
                seen += int(nz[r, j0:j0 + tc].sum())
    return np.array([starts[key] for key in sorted(starts)], np.int32)


@pytest.mark.parametrize("tile,band_rows", [((37, 64), 0), ((40, 64), 8), ((40, 64), 20), ((64, 150), 16),
                                            ((40, 64), 12), ((40, 64), 40)])
def test_row_bands(tile, band_rows):
    """Each band's start (tile offset + the tile's nonzeros above it) against a count in packed order;
    band sizes that do not divide the tile's rows (or are not smaller) keep the stored grid."""
    from ltjax.pallas._decode import row_bands

    ct = make_ct("bitmask_int8", 150, 131, tile=tile, seed=91)  # storage [131, 150]
    got_tile, got = row_bands(ct, band_rows)
    banded = 0 < band_rows < tile[0] and tile[0] % band_rows == 0
    assert got_tile == ((band_rows, tile[1]) if banded else tile)
    want = _band_starts_numpy(ct, got_tile[0])
    np.testing.assert_array_equal(np.asarray(got), want)
    indexed_tile, indexed = row_bands(ltjax.index_rows(ct), band_rows)  # read off the row starts it carries
    assert indexed_tile == got_tile
    np.testing.assert_array_equal(np.asarray(indexed), want)
    if not banded:
        np.testing.assert_array_equal(want, np.asarray(ct.offsets))  # the reference agrees with the format


@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("codec", ["bitmask", "bitmask_int8"])
@pytest.mark.parametrize("bs", [BlockSizes(block_m=1, block_n=8, block_k=64, split=0, num_stages=2, band_rows=16),
                                BlockSizes(block_m=16, block_n=8, block_k=64, split=0, num_stages=1, band_rows=8),
                                BlockSizes(block_m=4, block_n=8, block_k=32, split=2, num_stages=1, band_rows=16)],
                         ids=lambda b: f"m{b.block_m}k{b.block_k}s{b.split}st{b.num_stages}b{b.band_rows}")
def test_row_bands_in_the_kernels(codec, bs, xdtype):
    """Row bands (a program per band of a stored tile) in the forward, transposed and unpack kernels:
    ragged tiles at the row and column ends, a band smaller than a row chunk's walk."""
    k, n, m = 90, 131, 3
    ct = make_ct(codec, k, n, tile=(48, 64), seed=92)  # storage [131, 90]: 3 tile rows, the last 35 rows
    x, dy = rand((m, k), xdtype, seed=93), rand((m, n), xdtype, seed=94)
    assert_close(lp.bitmask_matmul(x, ct, interpret=INTERPRET, block_sizes=bs), _ref(x, ct))
    indexed = ltjax.index_rows(ct)  # band starts read off the weight's row index, not counted in XLA
    assert_close(lp.bitmask_matmul(x, indexed, interpret=INTERPRET, block_sizes=bs), _ref(x, ct))
    assert_close(lp.bitmask_matmul_t(dy, ct, interpret=INTERPRET, block_sizes=bs), _ref(dy, ct, True))
    want = np.asarray(decode_storage(ct))
    for transposed in (False, True):
        got = lp.bitmask_unpack(ct, interpret=INTERPRET, transposed=transposed, block_sizes=bs)
        np.testing.assert_array_equal(np.asarray(got), want.T if transposed else want)


@pytest.mark.parametrize("codec,wdtype", [("bitmask_int8", np.float32), ("bitmask", jnp.bfloat16)])
@pytest.mark.parametrize("axis", [1, 0])
def test_f32_activations_run_as_three_bf16_row_blocks(codec, wdtype, axis):
    """f32 x over a bitmask weight exact in bf16 (int8 codes, bf16 values) runs the bf16 kernel on
    [hi; mid; lo] (3 M rows) and stays f32-accurate, both directions, either channel axis."""
    k, n, m = 150, 72, 6
    ct = make_ct(codec, k, n, tile=(24, 64), dtype=wdtype, axis=axis, seed=71)
    x, dy = rand((m, k), jnp.float32, seed=72), rand((m, n), jnp.float32, seed=73)
    assert_close(lp.matmul(x, ct, interpret=INTERPRET), _ref(x, ct))
    assert_close(lp.matmul_t(dy, ct, interpret=INTERPRET), _ref(dy, ct, True))
    jaxpr = str(jax.make_jaxpr(functools.partial(lp.matmul, interpret=INTERPRET))(x, ct))
    assert f"bf16[{3 * m},{k}]" in jaxpr and "ltjax_bitmask_matmul" in jaxpr  # the kernel sees the bf16 rows
    # f32 weights are not exact in bf16: they keep the kernel's own f32 contraction
    ct32 = make_ct("bitmask", k, n, tile=(24, 64), axis=axis, seed=74)
    assert f"bf16[{3 * m},{k}]" not in str(jax.make_jaxpr(functools.partial(lp.matmul, interpret=INTERPRET))(x, ct32))
    assert_close(lp.matmul(x, ct32, interpret=INTERPRET), _ref(x, ct32))


@pytest.mark.parametrize("sparsity", [0.0, 0.95])
@pytest.mark.parametrize("seed", [0, 1])
def test_bitmask_sparsity_extremes(sparsity, seed):
    """Dense and nearly empty masks; 8-row tiles of 3 mask words, so words past a tile's end are masked."""
    k, n = 96 * 2 + 17, 29
    ct = make_ct("bitmask_int8", k, n, tile=(8, 96), sparsity=sparsity, seed=100 + seed)
    x, dy = rand((1, k), jnp.float32, seed=200 + seed), rand((1, n), jnp.float32, seed=300 + seed)
    assert_close(lp.matmul(x, ct, interpret=INTERPRET), _ref(x, ct))
    assert_close(lp.matmul_t(dy, ct, interpret=INTERPRET), _ref(dy, ct, True))
    np.testing.assert_array_equal(np.asarray(lp.decompress(ct, interpret=INTERPRET)),
                                  np.asarray(decompress_reference(ct)))


@pytest.mark.parametrize("codec", ["int8", "bitmask_int8"])
def test_channel_axis_0_and_transpose_view(codec):
    """A weight stored [K, N] (channel axis 0) and `ct.T` route to the other kernel direction."""
    k, n = 96, 50
    ct = make_ct(codec, k, n, tile=(32, 32), axis=0, seed=11)
    x = rand((2, k), jnp.float32, seed=12)
    assert_close(lp.matmul(x, ct, interpret=INTERPRET), _ref(x, ct))
    dy = rand((2, n), jnp.float32, seed=13)
    assert_close(lp.matmul(dy, ct.T, interpret=INTERPRET), _ref(dy, ct.T))


def test_f16_bf16_weights_and_all_zero_rows():
    w = random_weight((64, 33), sparsity=0.8, dtype=np.float16, seed=21)
    w[:, 5] = 0  # an all-zero output channel
    ct = pack(w, "bitmask", tile=(8, 32))
    x = rand((1, 64), jnp.float16, seed=22)
    assert_close(lp.matmul(x, ct, interpret=INTERPRET), _ref(x, ct))
    ct8 = make_ct("bitmask_int8", 64, 33, tile=(8, 64), dtype=jnp.bfloat16, seed=23)
    xb = rand((5, 64), jnp.bfloat16, seed=24)
    assert_close(lp.matmul(xb, ct8, interpret=INTERPRET), _ref(xb, ct8))


def test_empty_weight():
    ct = pack(np.zeros((64, 16), np.float32), "bitmask_int8", tile=(16, 32))
    x = rand((1, 64), jnp.float32, seed=41)
    np.testing.assert_array_equal(np.asarray(lp.matmul(x, ct, interpret=INTERPRET)), np.zeros((1, 16)))


# ------------------------------------------------------------------ decode to dense
# ltjax.decompress(impl="pallas"), bit-exact on every codec, N-D and stacked: tests/ops/test_decompress.py.
def test_multi_chunk_unpack():
    """Tiles wider than the block: several column chunks per tile."""
    ct8 = make_ct("bitmask_int8", 300, 20, tile=(12, 256), seed=62)
    got = lp.bitmask_unpack(ct8, interpret=INTERPRET, block_sizes=BlockSizes(block_n=8, block_k=64))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(decode_storage(ct8)))


@pytest.mark.parametrize("codec", ["bitmask", "bitmask_int8"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("stages", [1, 2])  # 2: the software-pipelined walk
def test_unpack_row_chunks_in_one_tile(codec, transposed, stages):
    """A tile row in one chunk, many row chunks per tile, ragged at both ends."""
    ct = make_ct(codec, 90, 131, tile=(37, 64), seed=64)  # storage [131, 90]: tiles of 37 rows, the last 20
    want = np.asarray(decode_storage(ct))
    bs = BlockSizes(block_n=8, block_k=64, num_stages=stages)
    got = lp.bitmask_unpack(ct, interpret=INTERPRET, transposed=transposed, block_sizes=bs)
    np.testing.assert_array_equal(np.asarray(got), want.T if transposed else want)


@pytest.mark.parametrize("codec", ["int8", "bitmask_int8", "bitmask"])
def test_unpack_transposed_output(codec):
    """The kernels' [K, N] output (what `decompress` uses for a 2-D axis=1 weight) with ragged blocks."""
    ct = make_ct(codec, 200, 75, tile=(24, 64), seed=63)
    want = np.asarray(decode_storage(ct)).T
    unpack = lp.int8_dequant if codec == "int8" else lp.bitmask_unpack
    for bs in (None, BlockSizes(block_n=16, block_k=32)):
        got = unpack(ct, interpret=INTERPRET, transposed=True, block_sizes=bs)
        assert got.shape == (200, 75)
        np.testing.assert_array_equal(np.asarray(got), want)


# ------------------------------------------------------------------ CUDA lowering (on any host)
def _lower_cuda(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


# jax 0.10 lowers Pallas-Triton for CUDA on any host (compute capability 9.0 when no GPU is
# present); jax 0.11 asks the device for its GPU model and refuses on a CPU-only host (its
# source: "No supported GPU devices found, please specify an abstract GPU device").
_NEEDS_GPU_TO_LOWER = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11)


@pytest.mark.parametrize("codec", ["int8", "bitmask_int8", "bitmask"])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_kernels_lower_for_cuda(codec, m):
    """Every kernel lowers through Pallas' Triton backend for CUDA (checks Triton-side rules on CPU)."""
    if _NEEDS_GPU_TO_LOWER and jax.default_backend() != "gpu":
        pytest.skip(f"jax {jax.__version__} lowers Pallas-Triton kernels only with a GPU present")
    k, n = 512, 384
    ct = make_ct(codec, k, n, tile=(64, 256), seed=71)
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    dy = jax.ShapeDtypeStruct((m, n), jnp.float32)
    _lower_cuda(functools.partial(lp.matmul, interpret=False), x, ct)
    _lower_cuda(functools.partial(lp.matmul_t, interpret=False), dy, ct)
    if m == 1:
        _lower_cuda(functools.partial(lp.decompress, interpret=False), ct)


# ------------------------------------------------------------------ predicates and config
def test_can_use_pallas():
    ct = make_ct("int8", 64, 32, seed=81)
    x = jnp.zeros((2, 64), jnp.float32)
    on_gpu = jax.default_backend() == "gpu"
    assert lp.can_use_pallas(x, ct) == on_gpu
    assert lp.can_use_pallas(x, ct, interpret=True)
    assert "columns" in lp.why_not_pallas(jnp.zeros((2, 63)), ct, interpret=True)
    assert lp.can_use_pallas(jnp.zeros((2, 32)), ct, transpose=True, interpret=True)
    assert "2-D" in lp.why_not_pallas(jnp.zeros((64,)), ct, interpret=True)
    assert "dtype" in lp.why_not_pallas(jnp.zeros((2, 64), jnp.int32), ct, interpret=True)
    with pytest.raises(ValueError, match="columns"):
        lp.matmul(jnp.zeros((2, 63)), ct, interpret=True)


def test_block_sizes_config(monkeypatch):
    monkeypatch.delenv(lp.TUNED_ENV, raising=False)  # the built-in table
    settings.cache_clear()
    bs = lp.get_block_sizes("int8_matmul", 1)
    assert hash(bs) == hash(BlockSizes(**{f: getattr(bs, f) for f in BlockSizes.__slots__}))
    assert lp.get_block_sizes("int8_matmul", 5).block_m == 16  # tl.dot path pads M to 16
    assert lp.get_block_sizes("int8_matmul", 1).block_m == 16  # batch 1 too
    assert lp.get_block_sizes("nope", 3).block_m == 16  # the default is a dot-path config
    assert fit_block_m(BlockSizes(block_m=64), 20).block_m == 32
    assert fit_block_m(BlockSizes(block_m=4), 3).block_m == 4  # broadcast path: shrunk, never padded
    assert fit_block_m(BlockSizes(block_m=4), 1).block_m == 1
    keys = [k for k, _ in lp.TUNED_BLOCK_SIZES]
    assert keys == sorted(keys)
    with pytest.raises(ValueError, match="power of 2"):
        BlockSizes(block_k=96)
    with pytest.raises(ValueError, match="must be >= 0"):
        BlockSizes(split=-1)
    with pytest.raises(ValueError, match="multiple of 32"):
        ct = make_ct("bitmask_int8", 64, 32, seed=91)
        lp.matmul(jnp.zeros((1, 64)), ct, interpret=True, block_sizes=BlockSizes(block_k=16))


def test_tuned_table_file(tmp_path, monkeypatch):
    """$LTJAX_PALLAS_TUNED rows override the built-in table (same key) and extend it (new key)."""
    import json

    f = tmp_path / "tuned.json"
    rows = [{"kernel": "int8_matmul", "dtype": "*", "max_m": 1,
             "block_sizes": {"block_m": 1, "block_n": 8, "block_k": 512, "split": 2, "num_warps": 4,
                             "num_stages": 3, "swap_ab": False}},
            {"kernel": "int8_matmul", "dtype": "*", "max_m": 16,
             "block_sizes": {"block_m": 16, "block_n": 128, "block_k": 256, "split": 2, "num_warps": 8,
                             "num_stages": 4, "swap_ab": True}}]
    f.write_text(json.dumps({"rows": rows}))
    monkeypatch.delenv(lp.TUNED_ENV, raising=False)  # the built-in table, whatever the caller set
    settings.cache_clear()
    before, before_t = lp.get_block_sizes("int8_matmul", 8), lp.get_block_sizes("int8_matmul_t", 8)
    monkeypatch.setenv(lp.TUNED_ENV, str(f))
    settings.cache_clear()
    assert lp.get_block_sizes("int8_matmul", 1) == BlockSizes(1, 8, 512, 2, 4, 3)
    assert lp.get_block_sizes("int8_matmul", 8) == BlockSizes(16, 128, 256, 2, 8, 4, swap_ab=True)
    assert lp.get_block_sizes("int8_matmul_t", 8) == before_t  # a kernel the file does not name
    # a kernel run with the file's block sizes still computes the right product
    ct = make_ct("int8", 300, 70, seed=5)
    x = rand((1, 300), jnp.float32, seed=6)
    assert_close(lp.matmul(x, ct, interpret=INTERPRET), _ref(x, ct))
    f.write_text(json.dumps({"rows": [{"kernel": "int8_matmul", "dtype": "*", "max_m": 1,
                                       "block_sizes": {"block_m": 1, "bogus": 3}}]}))
    os.utime(f, (1, 1))  # a new mtime: the cached table is re-read
    with pytest.raises(ValueError, match="LTJAX_PALLAS_TUNED.*bogus"):
        lp.get_block_sizes("int8_matmul", 1)
    monkeypatch.delenv(lp.TUNED_ENV)
    settings.cache_clear()
    assert lp.get_block_sizes("int8_matmul", 8) == before
