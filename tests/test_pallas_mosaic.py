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

from ltjax import pallas as lp
from ltjax._format import pack
from ltjax.pallas import BlockSizes
from ltjax.pallas import int8_matmul_mosaic as mm
from tests.test_pallas import INTERPRET, _close, _ref_matmul, _weight, _x

MOSAIC = BlockSizes(block_n=64, block_k=128, num_stages=4, backend="mosaic")
ON_HOPPER = (jax.default_backend() == "gpu"
             and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")
             and not INTERPRET)
needs_kernel = pytest.mark.skipif(mm._hm is None, reason=f"this JAX lacks the Mosaic GPU kernel: {mm._IMPORT_ERROR}")


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


@pytest.mark.parametrize("m,xdtype", [(1, jnp.bfloat16), (5, jnp.bfloat16), (40, jnp.bfloat16), (64, jnp.float16),
                                      (1, jnp.float32), (16, jnp.float32), (42, jnp.float32)])
def test_columns_and_finish_against_reference(m, xdtype):
    """The B operand and the epilogue, with the kernel's contract (exact products, f32 sums) emulated in jnp."""
    k, n = 256, 128
    ct = pack(_weight(_seed("cols", m, str(xdtype)), k, n, sparsity=0.0), "int8")
    x = _x(_seed("x", m, str(xdtype)), (m, k), xdtype)
    cols = mm.activation_columns(x)
    assert cols.shape == (k, mm.padded_cols(m, xdtype)) and cols.shape[1] in (32, 64, 128)
    assert cols.dtype == (jnp.float16 if xdtype == jnp.float16 else jnp.bfloat16)
    # What the kernel computes: int8 codes as the MMA's A operand, f32 accumulation of exact products.
    out = jnp.matmul(ct.codes.astype(jnp.float32), cols.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    got = mm.finish(out, m, ct.scales, x.dtype)
    _close(got, _ref_matmul(x, ct), xdtype)
    # The padding columns are zero: nothing of them can reach the result.
    used = 3 * m if xdtype == jnp.float32 else m
    assert not np.asarray(cols[:, used:], np.float32).any()


def test_f32_split_carries_every_bit():
    x = _x(7, (3, 512), jnp.float32) * 1e3
    hi, mid, lo = mm.split_bf16(x)
    np.testing.assert_array_equal(np.asarray(hi, np.float32) + np.asarray(mid, np.float32)
                                  + np.asarray(lo, np.float32), np.asarray(x))


def test_why_not_names_the_obstacle():
    ct = pack(_weight(1, 256, 128, sparsity=0.0), "int8")
    x = _x(2, (4, 256), jnp.bfloat16)
    if mm._hm is None:
        assert "Mosaic GPU" in mm.why_not_mosaic(x, ct, MOSAIC, interpret=False)
        return
    assert "interpret" in mm.why_not_mosaic(x, ct, MOSAIC, interpret=True)
    if not ON_HOPPER:
        assert mm.why_not_mosaic(x, ct, MOSAIC, interpret=False) is not None
        return
    assert mm.why_not_mosaic(x, ct, MOSAIC, interpret=False) is None
    ragged = pack(_weight(3, 200, 128, sparsity=0.0), "int8")
    assert "K = 200" in mm.why_not_mosaic(_x(4, (4, 200), jnp.bfloat16), ragged, MOSAIC, interpret=False)
    assert "rows" in mm.why_not_mosaic(x, pack(_weight(5, 256, 96, sparsity=0.0), "int8"), MOSAIC, interpret=False)
    assert "exceed" in mm.why_not_mosaic(_x(6, (64, 256), jnp.float32), ct, MOSAIC, interpret=False)
    bm = pack(_weight(8, 256, 128), "bitmask_int8")
    assert "int8 only" in mm.why_not_mosaic(x, bm, MOSAIC, interpret=False)


def test_block_sizes_validation():
    with pytest.raises(ValueError, match="backend"):
        BlockSizes(backend="cutlass")
    with pytest.raises(ValueError, match="block_n 64 or 128"):
        BlockSizes(block_n=32, block_k=128, backend="mosaic")
    ct = pack(_weight(9, 128, 64), "bitmask_int8")
    with pytest.raises(ValueError, match="only a Triton one"):
        lp.bitmask_matmul(_x(10, (2, 128), jnp.float32), ct, interpret=INTERPRET, block_sizes=MOSAIC)
    with pytest.raises(ValueError, match="only a Triton one"):
        lp.int8_matmul_t(_x(10, (2, 64), jnp.float32), pack(_weight(9, 128, 64), "int8"),
                         interpret=INTERPRET, block_sizes=MOSAIC)


@pytest.mark.parametrize("k,n", [(256, 128), (200, 70)])  # fits the Mosaic tiles / ragged: Triton either way off Hopper
@pytest.mark.parametrize("m,xdtype", [(1, jnp.bfloat16), (16, jnp.float32), (40, jnp.bfloat16), (70, jnp.float32)])
def test_mosaic_rows_run_or_fall_back(k, n, m, xdtype):
    """A "mosaic" block-size row gives the reference's answer wherever it runs: natively on Hopper,
    on the Triton kernel elsewhere (interpret mode on CPU) and for shapes the Mosaic tiles do not fit."""
    ct = pack(_weight(_seed("fb", k, n, m), k, n, sparsity=0.0), "int8")
    x = _x(_seed("fbx", k, n, m), (m, k), xdtype)
    _close(lp.matmul(x, ct, interpret=INTERPRET, block_sizes=MOSAIC), _ref_matmul(x, ct), xdtype)


def test_tuned_file_rows_carry_the_backend(tmp_path, monkeypatch):
    f = tmp_path / "tuned.json"
    f.write_text('{"rows": [{"kernel": "int8_matmul", "dtype": "bfloat16", "max_m": 16, "block_sizes": '
                 '{"block_m": 16, "block_n": 128, "block_k": 256, "split": 1, "num_warps": 4, "num_stages": 6, '
                 '"swap_ab": false, "backend": "mosaic"}}]}')
    monkeypatch.setenv(lp.TUNED_ENV, str(f))
    bs = lp.get_block_sizes("int8_matmul", 4, jnp.bfloat16)
    assert (bs.backend, bs.block_n, bs.block_k, bs.num_stages) == ("mosaic", 128, 256, 6)
    assert lp.get_block_sizes("int8_matmul", 4, jnp.bfloat16, backend="triton").backend == "triton"


@needs_kernel
@pytest.mark.skipif(not jax.__version__.startswith("0.10."),
                    reason=f"jax {jax.__version__}: Mosaic GPU lowering off-GPU is checked with jax 0.10 only")
@pytest.mark.parametrize("m,xdtype", [(1, jnp.bfloat16), (16, jnp.float32), (64, jnp.bfloat16)])
def test_lowers_for_cuda(m, xdtype, monkeypatch):
    """The kernel, at ltjax's shapes and tiles, lowers to a Mosaic GPU custom call on any host."""
    if jax.default_backend() != "gpu":  # the persistent grid is sized by the SM count, which a CPU lacks
        monkeypatch.setattr(mm._hm.backend, "get_default_device", lambda: types.SimpleNamespace(core_count=132))
    x = jax.ShapeDtypeStruct((m, 1024), xdtype)
    codes = jax.ShapeDtypeStruct((512, 1024), jnp.int8)
    scales = jax.ShapeDtypeStruct((512,), jnp.float32)
    for bs in (MOSAIC, BlockSizes(block_n=128, block_k=256, num_stages=2, backend="mosaic")):
        text = mm._mosaic.trace(x, codes, scales, block_sizes=bs).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


@needs_kernel
@pytest.mark.skipif(not jax.__version__.startswith("0.10."),
                    reason=f"jax {jax.__version__}: Mosaic GPU lowering off-GPU is checked with jax 0.10 only")
@pytest.mark.parametrize("bs,m,k", [(BlockSizes(block_n=128, block_k=256, num_stages=4, backend="mosaic"), 64, 8192),
                                    (BlockSizes(block_n=64, block_k=256, num_stages=6, backend="mosaic"), 48, 8192),
                                    (BlockSizes(block_n=64, block_k=128, num_stages=6, backend="mosaic"), 128, 4096)])
def test_smem_estimate_is_the_lowerings(bs, m, k, monkeypatch):
    """`why_not_mosaic` refuses a block that would not fit shared memory with the lowering's own byte count."""
    if jax.default_backend() != "gpu":
        monkeypatch.setattr(mm._hm.backend, "get_default_device", lambda: types.SimpleNamespace(core_count=132))
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    need = mm.smem_bytes(bs, mm.padded_cols(m, jnp.bfloat16), k)
    assert need > mm.SMEM_LIMIT  # each case is over the limit: the lowering must name the same count
    with pytest.raises(ValueError, match=f"smem_bytes={need} "):
        mm._mosaic.trace(x, jax.ShapeDtypeStruct((256, k), jnp.int8), jax.ShapeDtypeStruct((256,), jnp.float32),
                         block_sizes=bs).lower(lowering_platforms=("cuda",))


@pytest.mark.skipif(not ON_HOPPER, reason="the Mosaic GPU kernel runs natively on a Hopper GPU only")
@pytest.mark.parametrize("k,n", [(512, 256), (1024, 384)])
@pytest.mark.parametrize("m,xdtype", [(1, jnp.bfloat16), (4, jnp.float16), (16, jnp.bfloat16), (64, jnp.bfloat16),
                                      (1, jnp.float32), (16, jnp.float32), (42, jnp.float32)])
@pytest.mark.parametrize("bs", [MOSAIC, BlockSizes(block_n=128, block_k=256, num_stages=4, backend="mosaic")])
def test_native_against_reference(k, n, m, xdtype, bs):
    if n % bs.block_n or k % bs.block_k:
        pytest.skip(f"[{n}, {k}] does not tile by {bs.block_n} x {bs.block_k} (the fallback test covers it)")
    ct = pack(_weight(_seed("nat", k, n, m), k, n, sparsity=0.0), "int8")
    x = _x(_seed("natx", k, n, m), (m, k), xdtype)
    assert mm.why_not_mosaic(x, ct, bs, interpret=False) is None
    got = mm.int8_matmul_mosaic(x, ct, bs)
    _close(got, _ref_matmul(x, ct), xdtype)
    # and the same through the public Pallas entry point
    _close(lp.matmul(x, ct, interpret=False, block_sizes=bs), _ref_matmul(x, ct), xdtype)
