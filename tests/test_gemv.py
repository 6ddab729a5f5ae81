"""The CUDA small-M kernels (ltjax/ffi/cuda, int8 and bitmask_int8: GEMVs at M <= 4, tensor-core
kernels at M <= 16): their decode, emulated lane by lane on the CPU (the test build's
_ltjax_cuda_emulate.so), against the jnp reference; their argument checks; their lowering for CUDA;
their sm_90/sm_80 build; and, on a CUDA GPU, the kernels themselves."""

from __future__ import annotations

import ctypes
import dataclasses
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, make_ct, tolerance

import ltjax
from ltjax._format import pack
from ltjax.ffi import cuda

needs_emulation = pytest.mark.skipif(cuda.emulation_library()[0] is None, reason=str(cuda.emulation_library()[1]))
ON_GPU = jax.default_backend() == "gpu"

# (K, N, M, tile, sparsity): tile columns of 32 * 2^i (segments of 1-32 lanes), one tile column
# narrower than a word multiple or wider than a warp's step (the carried prefix), ragged K and
# N, tiles that cut rows, dense and all-zero weights.
CASES = [
    (300, 70, 1, (16, 64), 0.5),
    (1000, 37, 3, (8, 256), 0.9),
    (77, 45, 2, (256, 256), 0.0),
    (2100, 20, 4, (4, 4096), 0.5),
    (512, 64, 1, (1, 32), 0.5),
    (1500, 9, 4, (16, 1024), 0.3),
    (260, 33, 2, (32, 128), 1.0),
    (4097, 5, 1, (3, 512), 0.6),
]


def _ct(seed, k, n, tile, sparsity):
    if sparsity == 1.0:  # the all-zero weight
        return pack(np.zeros((k, n), np.float32), "bitmask_int8", tile=tile)
    return make_ct("bitmask_int8", k, n, tile=tile, sparsity=sparsity, seed=seed)


def _int8(seed, k, n):
    return make_ct("int8", k, n, sparsity=0.0, seed=seed)


def _close(got, x, ct):
    """Against the reference: f32 within the exact-products bound (`helpers.TOLERANCE`), else the table's."""
    want = ltjax.matmul_reference(x, ct)
    assert_close(got, want, tolerance(want.dtype, "exact products") if want.dtype == jnp.float32 else None)


@needs_emulation
@pytest.mark.parametrize("k,n,m,tile,sparsity", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_emulated_gemv_matches_reference(k, n, m, tile, sparsity, dtype):
    ct = _ct(k * 7 + n, k, n, tile, sparsity)
    assert cuda.seg_words(ct) is not None and cuda.why_not(jnp.zeros((m, k)), ct, emulate=True) is None
    x = jnp.asarray(np.random.default_rng(k + m).standard_normal((m, k)), dtype)
    got = cuda.matmul(x, ct, kernel="gemv")
    assert got.dtype == dtype and got.shape == (m, n)
    _close(got, x, ct)
    _close(cuda.matmul(x, ct), x, ct)  # M >= 2: the MMA kernel


# The MMA kernel (bitmask_int8, M <= 16): 16-row warps over ragged N, odd word counts (a half-empty
# last step), tile columns of 1, 2, 8 and 32 words and one spanning the row, K splits (`chunk`).
MMA_CASES = [
    (300, 70, 16, (16, 64), 0.5),
    (1000, 37, 5, (8, 256), 0.9),
    (77, 45, 2, (256, 256), 0.0),
    (2100, 20, 16, (4, 4096), 0.5),
    (512, 64, 9, (1, 32), 0.5),
    (1500, 9, 1, (16, 1024), 0.3),
    (260, 33, 12, (32, 128), 1.0),
    (4097, 17, 3, (3, 512), 0.6),
]


@needs_emulation
@pytest.mark.parametrize("k,n,m,tile,sparsity", MMA_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_emulated_mma_matches_reference(k, n, m, tile, sparsity, dtype):
    ct = _ct(k * 3 + n, k, n, tile, sparsity)
    assert cuda.why_not(jnp.zeros((m, k)), ct, emulate=True) is None
    x = jnp.asarray(np.random.default_rng(k + 7 * m).standard_normal((m, k)), dtype)
    got = cuda.matmul(x, ct, kernel="mma")
    assert got.dtype == dtype and got.shape == (m, n)
    _close(got, x, ct)
    if m >= cuda.MMA_MIN_M["bitmask_int8"]:
        assert cuda.kernel_for(x, ct) == "mma"


def test_mma_splits_follow_tile_columns():
    """K splits are whole tile columns (a split starts each row's prefix afresh) and bring an
    8192^2 weight's grid to 512 row warps x 8 splits."""
    assert cuda.mma_chunk_words(8192, 256, 8) == 32
    for n, w, seg in [(1024, 256, 8), (70, 10, 2), (37, 32, 8), (64, 16, 1), (5000, 100, 4)]:
        chunk = cuda.mma_chunk_words(n, w, seg)
        assert chunk % max(2, seg) == 0 and 1 <= -(-w // chunk) <= w
    assert cuda.mma_chunk_words(45, 3, 0) >= 3  # one tile column: one split


# int8 (K % 16 == 0): rows shorter than a warp's 512-column step, not a multiple of it, and several steps.
INT8_CASES = [(16, 7, 1), (400, 33, 2), (2064, 19, 4), (4096, 8, 3)]
# The int8 MMA kernel: K not a multiple of its 64-column step (lanes past K load zeros), N not a
# multiple of a warp's 16 rows, one to six n8 tiles of x (f32: three bf16 rows per row), K splits.
INT8_MMA_CASES = [(16, 7, 2), (400, 33, 5), (2064, 19, 16), (4096, 40, 3), (1040, 70, 9), (192, 130, 12)]


@needs_emulation
@pytest.mark.parametrize("k,n,m", INT8_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_emulated_int8_gemv_matches_reference(k, n, m, dtype):
    ct = _int8(k + n, k, n)
    assert cuda.why_not(jnp.zeros((m, k)), ct, emulate=True) is None
    x = jnp.asarray(np.random.default_rng(k * m).standard_normal((m, k)), dtype)
    got = cuda.matmul(x, ct, kernel="gemv")
    assert got.dtype == dtype and got.shape == (m, n)
    _close(got, x, ct)
    _close(cuda.matmul(x, ct), x, ct)  # M >= 3: the MMA kernel


@needs_emulation
@pytest.mark.parametrize("k,n,m", INT8_MMA_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_emulated_int8_mma_matches_reference(k, n, m, dtype):
    ct = _int8(k * 5 + n, k, n)
    assert cuda.why_not(jnp.zeros((m, k)), ct, emulate=True) is None
    x = jnp.asarray(np.random.default_rng(k + 11 * m).standard_normal((m, k)), dtype)
    got = cuda.matmul(x, ct, kernel="mma")
    assert got.dtype == dtype and got.shape == (m, n)
    _close(got, x, ct)
    assert cuda.kernel_for(x, ct) == ("mma" if m >= cuda.MMA_MIN_M["int8"] else "gemv")
    _close(cuda.matmul(x, ct), x, ct)


def test_int8_mma_splits_are_whole_steps():
    """K splits of the int8 MMA kernel are whole 64-column steps and bring an 8192^2 weight's grid
    to 512 row warps x 8 splits; a short row is one split."""
    assert cuda.int8_mma_chunk_cols(8192, 8192) == 1024
    for n, k in [(7, 16), (33, 400), (8192, 4096), (4096, 11008), (130, 192)]:
        chunk = cuda.int8_mma_chunk_cols(n, k)
        row_warps = -(-n // 16)
        assert chunk % 64 == 0 and chunk >= 64 and -(-k // chunk) * row_warps <= max(4096, row_warps)
    assert cuda.int8_mma_chunk_cols(8192, 48) == 64


@needs_emulation
@pytest.mark.parametrize("nnz", [1, 2, 3, 5, 11, 13, 41])
def test_packed_tail_words(nnz):
    """The last packed word may be partial and a few values may sit in fewer than three words:
    those reads go byte by byte and stop at the array's end."""
    rng = np.random.default_rng(nnz)
    k, n = 96, 3
    w = np.zeros((k, n), np.float32)
    flat = rng.choice(k * n, size=nnz, replace=False)
    w.reshape(-1)[flat] = rng.uniform(0.5, 2.0, nnz) * rng.choice([-1, 1], nnz)
    ct = jax.tree.map(jnp.asarray, pack(w, "bitmask_int8", tile=(2, 64)))
    assert ct.nnz == nnz
    x = jnp.asarray(rng.standard_normal((2, k)), jnp.float32)
    _close(cuda.matmul(x, ct), x, ct)


def test_refusals_name_the_reason():
    ct = _ct(5, 64, 16, (16, 64), 0.5)
    assert "1 to 16 rows" in cuda.why_not(jnp.zeros((17, 64)), ct, emulate=True)
    int8_64 = _int8(5, 64, 16)
    assert "int8 kernels take 1 to 16 rows" in cuda.why_not(jnp.zeros((17, 64)), int8_64, emulate=True)
    for w in (ct, int8_64):
        with pytest.raises(ValueError, match="GEMV takes 1 to 4 rows of x, got x\\(5, 64\\); the MMA kernels"):
            cuda.matmul(jnp.zeros((5, 64)), w, kernel="gemv")
    with pytest.raises(ValueError, match="kernel='fma': choose 'gemv', 'mma' or None"):
        cuda.matmul(jnp.zeros((1, 64)), int8_64, kernel="fma")
    raw = make_ct("raw", 64, 16, sparsity=0.0, seed=6)
    assert "decodes int8 and bitmask_int8, not 'raw'" in cuda.why_not(jnp.zeros((1, 64)), raw, emulate=True)
    int8 = _int8(6, 72, 16)
    assert "K % 16 == 0" in cuda.why_not(jnp.zeros((1, 72)), int8, emulate=True)
    odd = _ct(7, 300, 16, (16, 96), 0.5)  # tile columns of 3 words, several per row
    assert cuda.seg_words(odd) is None and "tile columns" in cuda.why_not(jnp.zeros((1, 300)), odd, emulate=True)
    if not ON_GPU:  # the platform is the op layer's question (tests/ops/test_matmul.py), not why_not's
        why = cuda.why_not(jnp.zeros((1, 64)), ct)
        assert why is None or "_ltjax_cuda.so" in why, why


def test_missing_emulation_says_how_to_build_it(monkeypatch):
    """Without the test build's emulation library, `why_not(emulate=True)` names the option that builds it."""
    missing = dataclasses.replace(cuda._EMULATION, file="_ltjax_cuda_emulate_absent.so")
    monkeypatch.setattr(cuda, "_EMULATION", missing)
    monkeypatch.setattr(cuda, "_registered", {})
    why = cuda.why_not(jnp.zeros((1, 64)), _ct(5, 64, 16, (16, 64), 0.5), emulate=True)
    assert "_ltjax_cuda_emulate_absent.so is not built" in why and "LTJAX_CUDA_EMULATION=ON" in why, why
    assert cuda.emulation_library()[0] is None


@needs_emulation
def test_handler_rejects_bad_operands():
    ct = _ct(8, 64, 16, (16, 64), 0.5)
    assert cuda.why_not(jnp.zeros((1, 64)), ct, emulate=True) is None  # registers the emulation's targets
    args = [jnp.zeros((1, 64), jnp.float32), ct.mask, cuda.row_starts(ct), ct.codes, ct.scales]
    out = jax.ShapeDtypeStruct((1, 16), jnp.float32)
    call = jax.ffi.ffi_call(cuda.TARGET, out)
    with pytest.raises(Exception, match=r"x must be float32 \[M, 32 W\], got \[1, 64\]"):
        call(args[0].astype(jnp.float16), *args[1:], seg_words=np.int64(2))
    with pytest.raises(Exception, match="seg_words must be 0 or a power of two <= 32, got 3"):
        call(*args, seg_words=np.int64(3))
    with pytest.raises(Exception, match=r"row_starts must be int32 \[N \* tile columns\] = \[16\]"):
        call(args[0], args[1], args[2][:-1], *args[3:], seg_words=np.int64(2))
    with pytest.raises(Exception, match=r"the GEMV takes 1 to 4 rows of x, got \[5, 64\]"):
        jax.ffi.ffi_call(cuda.TARGET, jax.ShapeDtypeStruct((5, 16), jnp.float32))(
            jnp.zeros((5, 64), jnp.float32), *args[1:], seg_words=np.int64(2))
    mma = jax.ffi.ffi_call(cuda.MMA_TARGET, jax.ShapeDtypeStruct((1, 8, 16), jnp.float32))
    xb = jnp.zeros((8, 64), jnp.bfloat16)
    with pytest.raises(Exception, match=r"x must be bfloat16 \[Mp, 64 ceil\(W / 2\)\], got \[8, 64\]"):
        mma(xb.astype(jnp.float32), *args[1:], seg_words=np.int64(2), chunk_words=np.int64(2))
    with pytest.raises(Exception, match="chunk_words must be even, a multiple of seg_words"):
        mma(xb, *args[1:], seg_words=np.int64(2), chunk_words=np.int64(3))
    with pytest.raises(Exception, match=r"the MMA kernel takes 8, 16, ..., 48 rows of x, got \[4, 64\]"):
        mma(xb[:4], *args[1:], seg_words=np.int64(2), chunk_words=np.int64(2))
    with pytest.raises(Exception, match=r"y must be float32 \[splits, Mp, N\] = \[1, 8, 16\]"):
        jax.ffi.ffi_call(cuda.MMA_TARGET, jax.ShapeDtypeStruct((2, 8, 16), jnp.float32))(
            xb, *args[1:], seg_words=np.int64(2), chunk_words=np.int64(2))
    int8 = _int8(9, 40, 8)
    call8 = jax.ffi.ffi_call(cuda.INT8_TARGET, jax.ShapeDtypeStruct((1, 8), jnp.float32))
    with pytest.raises(Exception, match=r"the int8 GEMV needs K % 16 == 0 \(16-byte rows\), got codes \[8, 40\]"):
        call8(jnp.zeros((1, 40), jnp.float32), int8.codes, int8.scales)
    with pytest.raises(Exception, match=r"x \[1, 48\] does not match codes \[8, 48\]|x \[1, 32\] does not match"):
        call8(jnp.zeros((1, 32), jnp.float32), jnp.zeros((8, 48), jnp.int8), int8.scales)
    int8_48 = _int8(9, 48, 8)
    mma8 = jax.ffi.ffi_call(cuda.INT8_MMA_TARGET, jax.ShapeDtypeStruct((1, 8, 8), jnp.float32))
    xb8 = jnp.zeros((8, 64), jnp.bfloat16)
    with pytest.raises(Exception, match=r"x must be bfloat16 \[Mp, 64 ceil\(K / 64\)\], got \[8, 64\]"):
        mma8(xb8.astype(jnp.float32), int8_48.codes, int8_48.scales, chunk_cols=np.int64(64))
    with pytest.raises(Exception, match=r"x must have 64 ceil\(K / 64\) columns, got \[8, 128\] for codes \[8, 48\]"):
        mma8(jnp.zeros((8, 128), jnp.bfloat16), int8_48.codes, int8_48.scales, chunk_cols=np.int64(64))
    with pytest.raises(Exception, match=r"the int8 MMA kernel needs K % 16 == 0 \(16-byte rows\), got codes \[8, 40\]"):
        mma8(xb8, int8.codes, int8.scales, chunk_cols=np.int64(64))
    with pytest.raises(Exception, match="chunk_cols must be a positive multiple of 64, got 96"):
        mma8(xb8, int8_48.codes, int8_48.scales, chunk_cols=np.int64(96))
    with pytest.raises(Exception, match=r"the MMA kernel takes 8, 16, ..., 48 rows of x, got \[56, 64\]"):
        mma8(jnp.zeros((56, 64), jnp.bfloat16), int8_48.codes, int8_48.scales, chunk_cols=np.int64(64))
    with pytest.raises(Exception, match=r"scales must be float32 \[N\], got \[7\]"):
        mma8(xb8, int8_48.codes, int8_48.scales[:7], chunk_cols=np.int64(64))
    with pytest.raises(Exception, match=r"y must be float32 \[splits, Mp, N\] = \[1, 8, 8\]"):
        jax.ffi.ffi_call(cuda.INT8_MMA_TARGET, jax.ShapeDtypeStruct((2, 8, 8), jnp.float32))(
            xb8, int8_48.codes, int8_48.scales, chunk_cols=np.int64(64))


def test_lowers_for_cuda():
    ct = _ct(9, 256, 32, (16, 128), 0.5)
    text = jax.jit(cuda.matmul).trace(jax.ShapeDtypeStruct((1, 256), jnp.bfloat16), ct).lower(
        lowering_platforms=("cuda",)).as_text()
    assert re.search(r"custom_call.*ltjax_bitmask_int8_gemv", text) or "@ltjax_bitmask_int8_gemv" in text
    assert "seg_words = 4" in text
    text = jax.jit(cuda.matmul).trace(jax.ShapeDtypeStruct((12, 256), jnp.float32), ct).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "ltjax_bitmask_int8_mma" in text and "chunk_words" in text
    int8 = _int8(10, 256, 32)
    text = jax.jit(cuda.matmul).trace(jax.ShapeDtypeStruct((2, 256), jnp.float32), int8).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "ltjax_int8_gemv" in text
    text = jax.jit(cuda.matmul).trace(jax.ShapeDtypeStruct((16, 256), jnp.bfloat16), int8).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "ltjax_int8_mma" in text and "chunk_cols" in text


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_library_builds_without_spills(tmp_path):
    """`python -m ltjax.ffi.cuda --build`'s nvcc line builds the library for sm_90 and sm_80 with
    no local-memory spills (ptxas -v), and it exports the four handlers."""
    proc = subprocess.run(cuda.nvcc_command(tmp_path / "lib.so", "-Xptxas", "-v"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", proc.stderr)]
    # (GEMVs: two codecs x M = 1..4, MMAs: two codecs x 1..6 n8 tiles) x two architectures
    assert len(regs) == 40, proc.stderr
    assert max(regs) <= 128, regs  # the launch bounds: 64 (M = 1, int8) to 128
    assert not re.search(r"[1-9]\d* bytes spill", proc.stderr), proc.stderr
    lib = ctypes.CDLL(str(tmp_path / "lib.so"))
    assert lib.LtjaxBitmaskInt8GemvCuda and lib.LtjaxInt8GemvCuda
    assert lib.LtjaxBitmaskInt8MmaCuda and lib.LtjaxInt8MmaCuda


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs in benchmarks/gpu_check.sh)")
@pytest.mark.parametrize(
    "k,n,m,tile,sparsity",
    CASES + MMA_CASES
    + [(4096, 4096, 1, (256, 256), 0.5), (8192, 1024, 4, (256, 256), 0.9), (8192, 2048, 16, (256, 256), 0.5)]
    + [(k, n, m, None, None) for k, n, m in INT8_CASES + INT8_MMA_CASES + [(8192, 2048, 1), (8192, 2048, 16)]])
def test_native_gpu_gemv_matches_reference(k, n, m, tile, sparsity):
    if sparsity is None:
        ct = _int8(k + n, k, n)
    else:
        ct = _ct(k + n, k, n, tile, sparsity)
    reason = cuda.why_not(jnp.zeros((m, k)), ct)
    if reason is not None and "not built" in reason:
        pytest.skip(reason)
    assert reason is None, reason
    kernels = ["gemv", "mma"] if m <= cuda.GEMV_MAX_M else ["mma"]
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), dtype)
        for kernel in kernels:
            _close(jax.jit(cuda.matmul, static_argnames="kernel")(x, ct, kernel=kernel), x, ct)
    e = ltjax.explain(x, ct, impl="cuda")
    assert e.impl == "cuda" and not e.interpret, str(e)
