"""The int8 Mosaic GPU path (`ltjax.pallas.int8_matmul_mosaic`): around the kernel on any host, the kernel on Hopper.

The kernel itself is JAX's mixed-type Hopper matmul; it has no interpret mode, so off-GPU
these tests check what ltjax adds around it (the activation columns, the f32 hi/mid/lo split,
the scales and transpose, the fallback to Triton, the CUDA lowering) against an independent
f32 reference, and `benchmarks/gpu_check.sh` runs the native tests on the GPU.
"""

from __future__ import annotations

import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, make_ct, rand

import ltjax
from ltjax import pallas as lp
from ltjax._config import settings
from ltjax.pallas import BlockSizes, MosaicTiles, int8_matmul_mosaic as mm

INTERPRET = lp.resolve_interpret(None)

MOSAIC = MosaicTiles(tile_m=64, tile_k=128, stages=4)
BIG = MosaicTiles(tile_m=128, tile_k=128, stages=2)  # fits shared memory up to 128 activation columns
WITH_MOSAIC = BlockSizes(block_m=16, block_n=32, block_k=128, split=1, mosaic=MOSAIC)
ON_HOPPER = (jax.default_backend() == "gpu"
             and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")
             and not INTERPRET)
needs_kernel = pytest.mark.skipif(mm.jax_kernel()[0] is None,
                                  reason=f"this JAX lacks the Mosaic GPU kernel: {mm.jax_kernel()[1]}")


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


@pytest.mark.parametrize("m,xdtype", [(1, jnp.bfloat16), (5, jnp.bfloat16), (40, jnp.bfloat16), (64, jnp.float16),
                                      (1, jnp.float32), (16, jnp.float32), (42, jnp.float32)])
def test_columns_and_finish_against_reference(m, xdtype):
    """The B operand and the epilogue, with the kernel's contract (exact products, f32 sums) emulated in jnp."""
    k, n = 256, 128
    ct = make_ct("int8", k, n, sparsity=0.0, seed=_seed("cols", m, str(xdtype)))
    x = rand((m, k), xdtype, seed=_seed("x", m, str(xdtype)))
    cols = mm.activation_columns(x)
    assert cols.shape == (k, mm.padded_cols(m, xdtype)) and cols.shape[1] in (32, 64, 128)
    assert cols.dtype == (jnp.float16 if xdtype == jnp.float16 else jnp.bfloat16)
    # What the kernel computes: int8 codes as the MMA's A operand, f32 accumulation of exact products.
    out = jnp.matmul(ct.codes.astype(jnp.float32), cols.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    got = mm.finish(out, m, ct.scales, x.dtype)
    assert_close(got, ltjax.matmul_reference(x, ct))
    # The padding columns are zero: nothing of them can reach the result.
    used = 3 * m if xdtype == jnp.float32 else m
    assert not np.asarray(cols[:, used:], np.float32).any()


def test_f32_split_carries_every_bit():
    x = rand((3, 512), jnp.float32, seed=7) * 1e3
    hi, mid, lo = mm.split_bf16(x)
    np.testing.assert_array_equal(np.asarray(hi, np.float32) + np.asarray(mid, np.float32)
                                  + np.asarray(lo, np.float32), np.asarray(x))


def test_why_not_names_the_obstacle():
    ct = make_ct("int8", 256, 128, sparsity=0.0, seed=1)
    x = rand((4, 256), jnp.bfloat16, seed=2)
    if mm.jax_kernel()[0] is None:
        assert "Mosaic GPU" in mm.why_not_mosaic(x, ct, MOSAIC, interpret=False)
        return
    assert "interpret" in mm.why_not_mosaic(x, ct, MOSAIC, interpret=True)
    if not ON_HOPPER:
        assert mm.why_not_mosaic(x, ct, MOSAIC, interpret=False) is not None
        return
    assert mm.why_not_mosaic(x, ct, MOSAIC, interpret=False) is None
    ragged = make_ct("int8", 200, 128, sparsity=0.0, seed=3)
    assert "K = 200" in mm.why_not_mosaic(rand((4, 200), jnp.bfloat16, seed=4), ragged, MOSAIC, interpret=False)
    assert "rows" in mm.why_not_mosaic(x, make_ct("int8", 256, 96, sparsity=0.0, seed=5), MOSAIC, interpret=False)
    assert "exceed" in mm.why_not_mosaic(rand((64, 256), jnp.float32, seed=6), ct, MOSAIC, interpret=False)
    bm = make_ct("bitmask_int8", 256, 128, seed=8)
    assert "int8 only" in mm.why_not_mosaic(x, bm, MOSAIC, interpret=False)


def test_block_sizes_validation():
    with pytest.raises(ValueError, match="tile_m 64 or 128"):
        MosaicTiles(tile_m=32)
    with pytest.raises(ValueError, match="stages"):
        MosaicTiles(stages=1)
    with pytest.raises(ValueError, match="MosaicTiles or None"):
        BlockSizes(mosaic=(64, 128, 4))
    ct = make_ct("bitmask_int8", 128, 64, seed=9)
    with pytest.raises(ValueError, match="only a Triton one"):
        lp.bitmask_matmul(rand((2, 128), jnp.float32, seed=10), ct, interpret=INTERPRET, block_sizes=WITH_MOSAIC)
    with pytest.raises(ValueError, match="only a Triton one"):
        lp.int8_matmul_t(rand((2, 64), jnp.float32, seed=10), make_ct("int8", 128, 64, seed=9),
                         interpret=INTERPRET, block_sizes=WITH_MOSAIC)


@pytest.mark.parametrize("k,n", [(256, 128), (200, 70)])  # fits the Mosaic tiles / ragged: Triton either way off Hopper
@pytest.mark.parametrize("m,xdtype", [(1, jnp.bfloat16), (16, jnp.float32), (40, jnp.bfloat16), (70, jnp.float32)])
def test_mosaic_rows_run_or_fall_back(k, n, m, xdtype):
    """A "mosaic" block-size row gives the reference's answer wherever it runs: natively on Hopper,
    on the Triton kernel elsewhere (interpret mode on CPU) and for shapes the Mosaic tiles do not fit."""
    ct = make_ct("int8", k, n, sparsity=0.0, seed=_seed("fb", k, n, m))
    x = rand((m, k), xdtype, seed=_seed("fbx", k, n, m))
    assert_close(lp.matmul(x, ct, interpret=INTERPRET, block_sizes=WITH_MOSAIC), ltjax.matmul_reference(x, ct))
    if not ON_HOPPER:  # off Hopper the row's Triton blocks ran
        assert mm.why_not_mosaic(x, ct, MOSAIC, interpret=INTERPRET) is not None


def test_kernel_backend_follows_the_table_and_the_device(tmp_path, monkeypatch):
    f = tmp_path / "tuned.json"
    f.write_text('{"rows": [{"kernel": "int8_matmul", "dtype": "float32", "max_m": 16, "block_sizes": '
                 '{"block_m": 16, "block_n": 32, "block_k": 128, '
                 '"mosaic": {"tile_m": 64, "tile_k": 128, "stages": 4}}}]}')
    monkeypatch.setenv(lp.TUNED_ENV, str(f))
    settings.cache_clear()
    ct = make_ct("int8", 256, 128, sparsity=0.0, seed=11)
    x = rand((4, 256), jnp.float32, seed=12)
    assert lp.kernel_backend(x, ct, interpret=INTERPRET) == ("mosaic" if ON_HOPPER else "triton")
    assert lp.kernel_backend(rand((40, 256), jnp.float32, seed=13), ct, interpret=INTERPRET) == "triton"  # no such row
    assert lp.kernel_backend(x, make_ct("raw", 256, 128, seed=14)) == "xla"
    assert lp.kernel_backend(rand((4, 128), jnp.float32, seed=15), ct, transpose=True, interpret=INTERPRET) == "triton"


def test_tuned_file_rows_carry_mosaic_tiles(tmp_path, monkeypatch):
    f = tmp_path / "tuned.json"
    f.write_text('{"rows": [{"kernel": "int8_matmul", "dtype": "bfloat16", "max_m": 16, "block_sizes": '
                 '{"block_m": 16, "block_n": 128, "block_k": 256, "split": 1, "num_warps": 4, "num_stages": 3, '
                 '"swap_ab": false, "mosaic": {"tile_m": 128, "tile_k": 256, "stages": 6}}}, '
                 '{"kernel": "int8_matmul", "dtype": "float32", "max_m": 16, "block_sizes": '
                 '{"block_m": 16, "block_n": 128, "block_k": 256, "split": 2, "mosaic": null}}]}')
    monkeypatch.setenv(lp.TUNED_ENV, str(f))
    settings.cache_clear()
    bs = lp.get_block_sizes("int8_matmul", 4, jnp.bfloat16)
    assert bs.mosaic == MosaicTiles(tile_m=128, tile_k=256, stages=6) and (bs.block_n, bs.num_stages) == (128, 3)
    assert lp.get_block_sizes("int8_matmul", 4, jnp.float32).mosaic is None  # a file row turns Mosaic off


@needs_kernel
@pytest.mark.skipif(not jax.__version__.startswith("0.10."),
                    reason=f"jax {jax.__version__}: Mosaic GPU lowering off-GPU is checked with jax 0.10 only")
@pytest.mark.parametrize("m,xdtype", [(1, jnp.bfloat16), (16, jnp.float32), (64, jnp.bfloat16)])
def test_lowers_for_cuda(m, xdtype, monkeypatch):
    """The kernel, at ltjax's shapes and tiles, lowers to a Mosaic GPU custom call on any host."""
    if jax.default_backend() != "gpu":  # the persistent grid is sized by the SM count, which a CPU lacks
        monkeypatch.setattr(mm.jax_kernel()[0].backend, "get_default_device",
                            lambda: types.SimpleNamespace(core_count=132))
    x = jax.ShapeDtypeStruct((m, 1024), xdtype)
    codes = jax.ShapeDtypeStruct((512, 1024), jnp.int8)
    scales = jax.ShapeDtypeStruct((512,), jnp.float32)
    for tiles in (MOSAIC, BIG):
        text = mm.mosaic_matmul.trace(x, codes, scales, tiles=tiles).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


@needs_kernel
@pytest.mark.skipif(not jax.__version__.startswith("0.10."),
                    reason=f"jax {jax.__version__}: Mosaic GPU lowering off-GPU is checked with jax 0.10 only")
@pytest.mark.parametrize("tiles,m,k", [(MosaicTiles(128, 256, 4), 64, 8192), (MosaicTiles(64, 256, 6), 48, 8192),
                                       (MosaicTiles(64, 128, 6), 128, 4096)])
def test_smem_estimate_is_the_lowerings(tiles, m, k, monkeypatch):
    """`why_not_mosaic` refuses a block that would not fit shared memory with the lowering's own byte count."""
    if jax.default_backend() != "gpu":
        monkeypatch.setattr(mm.jax_kernel()[0].backend, "get_default_device",
                            lambda: types.SimpleNamespace(core_count=132))
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    need = mm.smem_bytes(tiles, mm.padded_cols(m, jnp.bfloat16), k)
    assert need > mm.SMEM_LIMIT  # each case is over the limit: the lowering must name the same count
    with pytest.raises(ValueError, match=f"smem_bytes={need} "):
        mm.mosaic_matmul.trace(x, jax.ShapeDtypeStruct((256, k), jnp.int8), jax.ShapeDtypeStruct((256,), jnp.float32),
                         tiles=tiles).lower(lowering_platforms=("cuda",))


@pytest.mark.skipif(not ON_HOPPER, reason="the Mosaic GPU kernel runs natively on a Hopper GPU only")
@pytest.mark.parametrize("k,n", [(512, 256), (1024, 384)])
@pytest.mark.parametrize("m,xdtype", [(1, jnp.bfloat16), (4, jnp.float16), (16, jnp.bfloat16), (64, jnp.bfloat16),
                                      (1, jnp.float32), (16, jnp.float32), (42, jnp.float32)])
@pytest.mark.parametrize("tiles", [MOSAIC, BIG])
def test_native_against_reference(k, n, m, xdtype, tiles):
    if n % tiles.tile_m or k % tiles.tile_k:
        pytest.skip(f"[{n}, {k}] does not tile by {tiles.tile_m} x {tiles.tile_k} (the fallback test covers it)")
    ct = make_ct("int8", k, n, sparsity=0.0, seed=_seed("nat", k, n, m))
    x = rand((m, k), xdtype, seed=_seed("natx", k, n, m))
    assert mm.why_not_mosaic(x, ct, tiles, interpret=False) is None
    got = mm.int8_matmul_mosaic(x, ct, tiles)
    assert_close(got, ltjax.matmul_reference(x, ct))
    # and the same through the public Pallas entry point
    bs = BlockSizes(block_m=16, block_n=32, block_k=128, split=1, mosaic=tiles)
    assert_close(lp.matmul(x, ct, interpret=False, block_sizes=bs), ltjax.matmul_reference(x, ct))
