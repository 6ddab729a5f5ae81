"""CPU XLA FFI handlers (ltjax.ffi.cpu) against the jnp reference decoder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, make_ct, rand, rerun_module

import ltjax
import ltjax.ffi.cpu as lffi
from ltjax._format import decode_storage, decompress_reference, pack

ROOT = Path(__file__).resolve().parents[1]
needs_ffi = pytest.mark.skipif(not lffi.available(), reason=f"ltjax.ffi.cpu unavailable: {lffi.unavailable_reason()}")

CODECS = ("int8", "bitmask_int8", "bitmask")
# (K, N, M, tile): ragged sizes (not multiples of 32 / 16 / 4), tiles that cut rows mid-way;
# M = 1 (the GEMV kernels): N = 77 and 6 leave row tails after the blocks of four, and
# 1000 x 300 is large enough to be split across the thread pool.
SHAPES = [(100, 70, 3, (16, 32)), (300, 257, 5, (7, 64)), (1, 9, 2, None), (513, 130, 17, None),
          (300, 77, 1, (7, 64)), (1000, 6, 1, (16, 96)), (1000, 300, 1, None)]


def _pack(key, k, n, codec, tile, dtype=np.float32):
    """int8 dense, the bitmask codecs half zeros."""
    return make_ct(codec, k, n, tile=tile, sparsity=0.0 if codec == "int8" else 0.5, dtype=dtype, seed=key)


@needs_ffi
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_matmul_and_transposed_match_reference(codec, shape, xdtype):
    k, n, m, tile = shape
    ct = _pack(k * 7 + n, k, n, codec, tile)
    x, dy = rand((m, k), xdtype, seed=m), rand((m, n), xdtype, seed=m + 1)
    y = jax.jit(lffi.matmul)(x, ct)
    dx = jax.jit(lffi.matmul_t)(dy, ct)
    assert_close(y, ltjax.matmul_reference(x, ct))
    assert_close(dx, ltjax.matmul_reference(dy, ct.T))


@needs_ffi
@pytest.mark.parametrize("vdtype", [np.float32, jnp.bfloat16, np.float16], ids=["f32", "bf16", "f16"])
def test_bitmask_values_dtypes(vdtype):
    """Packed values of each float dtype (their unpack, bit-exact: tests/ops/test_decompress.py)."""
    ct = _pack(3, 96, 40, "bitmask", (8, 32), vdtype)
    x = rand((4, 96), seed=0)
    assert_close(lffi.matmul(x, ct), ltjax.matmul_reference(x, ct))


# Batch dims, vmap over x and over stacked weights, gradients through the public VJP, bit-exact
# unpack (-0.0, N-D): tests/ops/test_matmul.py and test_decompress.py, on impl="ffi".


@needs_ffi
def test_no_dense_temp():
    ct = _pack(0, 1024, 1024, "bitmask_int8", None)
    ct8 = _pack(0, 1024, 1024, "int8", None)
    x = jnp.ones((16, 1024))
    for c in (ct, ct8):
        temp = jax.jit(lffi.matmul).lower(x, c).compile().memory_analysis().temp_size_in_bytes
        assert temp < 1024 * 1024, temp  # a dense f32 weight would be 4 MiB


@needs_ffi
@pytest.mark.parametrize(
    "env, select, at_least",
    [({"LTJAX_FFI_ISA": "avx2"}, "", 50), ({"LTJAX_FFI_ISA": "avx2", "LTJAX_FFI_VNNI": "0"}, "", 50),
     ({"LTJAX_FFI_AMX": "0"}, "int8 and ", 20)],
    ids=["avx2", "avx2-novnni", "avx512-noamx-int8"],
)
def test_whole_module_again_on_the_other_kernels(env, select, at_least):
    """The tests of this module once more on the kernels this CPU would otherwise skip: AVX2 (the
    path of CPUs without AVX-512: most laptops) with AVX-VNNI where this CPU has it, AVX2 with
    LTJAX_FFI_VNNI=0 (the f32 walk of AVX2 CPUs without it), and the int8 tests with
    LTJAX_FFI_AMX=0 (the f32 micro-kernel that AMX replaces at 2 <= M <= 64). The choice is fixed
    when the library loads, so in a fresh process; `test_isa_override_is_honoured` there proves
    the override took."""
    rerun_module(__file__, env, select + "not test_whole_module_again", at_least)


@needs_ffi
def test_isa_override_is_honoured():
    info = lffi.info()
    if os.environ.get("LTJAX_FFI_ISA") == "avx2":
        assert info["isa"] == "avx2" and info["vnni"] in (False, "avx_vnni"), info
    else:
        assert info["isa"] in ("avx2", "avx512"), info
    if os.environ.get("LTJAX_FFI_VNNI") == "0":
        assert info["vnni"] is False, info
    if os.environ.get("LTJAX_FFI_AMX") == "0" or info["isa"] != "avx512":
        assert info["amx"] is False, info


@needs_ffi
def test_settings_reach_the_extension_which_reads_no_environment():
    """The handlers do not read the environment: `ltjax.ffi.cpu` hands them `ltjax._config.settings()`
    when it loads (LTJAX_FFI_THREADS here), and a later `configure()` is refused."""
    code = textwrap.dedent(
        """
        import ltjax.ffi.cpu as F
        from ltjax.ffi.cpu import _ltjax_ffi
        assert F.info()["threads"] == 1, F.info()
        try:
            _ltjax_ffi.configure("", True, True, 4, 0)
        except RuntimeError as e:
            print("refused:", e)
        """
    )
    env = {**os.environ, "LTJAX_FFI_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "refused: ltjax: configure() after" in r.stdout, r.stdout + r.stderr[-2000:]
    sources = [p for ext in ("*.cc", "*.h") for p in (ROOT / "ltjax/ffi/cpu").glob(ext)]
    assert sources and not [p.name for p in sources if "getenv" in p.read_text()]


# ---------------------------------------------------------------------- M = 1 bitmask_int8 GEMV
# (K, N, tile): the 256-column tile span of the two-row VNNI kernel; a ragged K (partial last
# mask word); 7-row tiles with N large enough to split across the pool (chunks start mid-tile)
# and 3 mask words per tile column (odd
# word tail); one tile column spanning the row.
GEMV_SHAPES = [(4096, 300, None), (300, 257, (7, 64)), (1000, 600, (7, 96)), (70, 33, (5, 96)), (2048, 130, (64, 2048))]


def _gemv_bound(x64, codes, scales, y64, vnni):
    """Largest |y - y_exact| a correct kernel may give: with VNNI, x rounded to 24-bit fixed point
    (half a step of max|x| / 8355711 per element) plus two f32 roundings of the result; without,
    the f32 walk's: each output is a tree of f32 roundings (per lane at most ceil(K / 32) FMAs,
    then at most 8 levels of partial-sum adds, the horizontal sum and the scale), so
    |error| <= depth * 2^-24 * scale * sum_k |b_k x_k| to first order (1% added for the rest)."""
    absb = np.abs(codes).astype(np.float64) @ np.ones(codes.shape[1])  # sum_k |b| per row
    if vnni:
        qs = np.abs(x64).max() / 8355711
        return scales * absb * qs / 2 + np.abs(y64) * 2.0**-22 + 1e-30
    depth = -(-codes.shape[1] // 32) + 8
    return scales * (np.abs(codes) @ np.abs(x64)) * depth * 2.0**-24 * 1.01 + 1e-30


def _integer_gemv(codec: str) -> bool:
    """Whether M = 1 of ``codec`` runs an integer path here: bitmask_int8 on either VNNI; int8 on
    AVX-512 VNNI or AMX (AVX-VNNI CPUs keep int8's f32 walk)."""
    info = lffi.info()
    if codec == "int8":
        return info["vnni"] == "avx512_vnni" or bool(info["amx"])
    return bool(info["vnni"])


@needs_ffi
@pytest.mark.parametrize("codec", ["bitmask_int8", "int8"])
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=str)
@pytest.mark.parametrize("outliers", [False, True], ids=["normal", "outliers"])
def test_m1_int8_codes_within_stated_error(codec, shape, outliers):
    """M = 1 bitmask_int8 and int8 (the integer paths where the CPU has them) against a float64
    reference, within the error docs/ffi.md states, and that bound far below the values themselves."""
    k, n, tile = shape
    rng = np.random.default_rng()
    w = rng.standard_normal((k, n)).astype(np.float32)
    if codec == "bitmask_int8":
        w[rng.random((k, n)) < 0.5] = 0.0
    ct = jax.tree.map(jnp.asarray, pack(w, codec, tile=tile))
    x = rng.standard_normal((1, k)).astype(np.float32)
    if outliers:  # LLM-like activations: a few channels 100x the rest
        x[0, rng.choice(k, max(1, k // 100), replace=False)] *= 100.0
    codes = np.asarray(decode_storage(ct)).astype(np.float64) / np.asarray(ct.scales, np.float64)[:, None]
    codes = np.rint(codes)  # [N, K] integer codes, exactly
    scales = np.asarray(ct.scales, np.float64)
    y64 = scales * (codes @ x[0].astype(np.float64))
    y = np.asarray(jax.jit(lffi.matmul)(jnp.asarray(x), ct), np.float64)[0]
    integer = _integer_gemv(codec)
    bound = _gemv_bound(x[0].astype(np.float64), codes, scales, y64, integer)
    err = np.abs(y - y64)
    assert np.all(err <= bound), (err.max(), bound[np.argmax(err - bound)])
    # the bound is not vacuous: it is far below the values themselves (the f32 walk's grows with K;
    # int8's sum |b| runs over twice the codes of bitmask_int8 at 50% zeros)
    # (with 1% outliers at 100x, bitmask_int8's median reached 1.003e-4 once in fresh draws: 3e-4 for both)
    limit = 3e-4 if integer else 1e-3
    assert np.median(bound / np.maximum(np.abs(y64), 1e-30)) < limit


@needs_ffi
def test_m1_bitmask_int8_same_answer_on_both_vector_widths(tmp_path):
    """The AVX2 process (LTJAX_FFI_ISA=avx2: AVX-VNNI's ymm GEMV where the CPU has it) against this
    one: when both run an integer (VNNI) path they sum the same integers, so the outputs are
    bit-identical; otherwise they agree within the f32 walk's error."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((1000, 300)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0
    x = rng.standard_normal((1, 1000)).astype(np.float32)
    x[0, ::97] *= 100.0
    ct = pack(w, "bitmask_int8", tile=(64, 256))
    here = np.asarray(jax.jit(lffi.matmul)(jnp.asarray(x), jax.tree.map(jnp.asarray, ct)))
    code = textwrap.dedent(
        """
        import sys, jax, jax.numpy as jnp, numpy as np
        import ltjax.ffi.cpu as F
        from ltjax._format import pack
        rng = np.random.default_rng(7)
        w = rng.standard_normal((1000, 300)).astype(np.float32)
        w[rng.random(w.shape) < 0.5] = 0.0
        x = rng.standard_normal((1, 1000)).astype(np.float32)
        x[0, ::97] *= 100.0
        y = np.asarray(F.matmul(jnp.asarray(x), pack(w, "bitmask_int8", tile=(64, 256))))
        np.save(sys.argv[1], y)
        print(F.info()["vnni"])
        """
    )
    out = tmp_path / "y_avx2.npy"
    env = {**os.environ, "LTJAX_FFI_ISA": "avx2", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    other = np.load(out)
    if lffi.info()["vnni"] and r.stdout.strip() != "False":
        np.testing.assert_array_equal(other, here)
    else:
        np.testing.assert_allclose(other, here, rtol=1e-4, atol=1e-3 * float(np.abs(here).max()))


@needs_ffi
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_m1_bitmask_int8_non_finite_x_propagates(bad):
    """x with NaN/inf cannot be written as integer digits: the f32 walk runs and the result is
    NaN/inf exactly where the reference's is."""
    ct = _pack(3, 96, 40, "bitmask_int8", (8, 32))
    x = np.random.default_rng(1).standard_normal((1, 96)).astype(np.float32)
    x[0, 5] = bad
    y = np.asarray(jax.jit(lffi.matmul)(jnp.asarray(x), ct))
    want = np.asarray(jnp.asarray(x) @ decompress_reference(ct))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(want))


@needs_ffi
def test_m1_bitmask_int8_f32_walk_when_vnni_off():
    """LTJAX_FFI_VNNI=0 forces the f32 walk (the path of AVX-512 CPUs without VNNI)."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        import ltjax.ffi.cpu as F
        from ltjax._format import pack, decompress_reference
        assert F.info()["vnni"] is False, F.info()
        rng = np.random.default_rng(0)
        w = rng.standard_normal((1000, 600)).astype(np.float32); w[rng.random(w.shape) < .5] = 0
        ct = pack(w, "bitmask_int8", tile=(16, 96))
        x = jnp.asarray(rng.standard_normal((1, 1000)).astype(np.float32))
        np.testing.assert_allclose(F.matmul(x, ct), x @ decompress_reference(ct), rtol=2e-5, atol=2e-4)
        print("ok")
        """
    )
    env = {**os.environ, "LTJAX_FFI_VNNI": "0", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# ---------------------------------------------------------------------- int8 GEMM on AMX tiles
@needs_ffi
@pytest.mark.parametrize("codec", ["int8", "bitmask_int8"])
@pytest.mark.parametrize("shape", [(100, 70, 3, (16, 32)), (300, 257, 5, (7, 64)), (64, 16, 2, None),
                                   (1000, 33, 17, None), (513, 130, 16, (32, 96)), (2048, 300, 64, None),
                                   (1, 9, 2, None)], ids=str)
def test_int8_gemm_within_stated_error(codec, shape):
    """int8 codes at 2 <= M <= 64 (AMX tiles where the CPU has them: x as 24-bit fixed point per
    row, exact integer sums; bitmask_int8 from M = 8, expanded 16 rows at a time; below, the f32
    micro-kernel) against a float64 reference
    with LLM-like outliers in x, within the error docs/ffi.md states; ragged K (partial 64-column
    chunk), N (partial 16-row block), M, tiles that cut rows."""
    k, n, m, tile = shape
    rng = np.random.default_rng(k + n + m)
    w = rng.standard_normal((k, n)).astype(np.float32)
    if codec == "bitmask_int8":
        w[rng.random(w.shape) < 0.5] = 0.0
    ct = jax.tree.map(jnp.asarray, pack(w, codec, tile=tile))
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, rng.choice(k, max(1, k // 50), replace=False)] *= 100.0
    scales = np.asarray(ct.scales, np.float64)
    dec = np.asarray(decode_storage(ct), np.float64)  # [N, K]; an all-zero row has scale 0
    codes = np.rint(np.divide(dec, scales[:, None], out=np.zeros_like(dec), where=scales[:, None] != 0))
    y64 = (x.astype(np.float64) @ codes.T) * scales
    y = np.asarray(jax.jit(lffi.matmul)(jnp.asarray(x), ct), np.float64)
    if lffi.info()["amx"] and (codec == "int8" or m >= 8):
        qs = np.abs(x).max(axis=1, keepdims=True).astype(np.float64) / 8355711  # per row of x
        bound = scales * (np.abs(codes).sum(axis=1) * qs) / 2 + np.abs(y64) * 2.0**-22 + 1e-30
    else:
        depth = -(-k // 8) + 8  # the f32 micro-kernel: at most K / 8 FMAs per lane (AVX2), then the sums
        bound = (np.abs(x).astype(np.float64) @ np.abs(codes).T) * scales * depth * 2.0**-24 * 1.01 + 1e-30
    err = np.abs(y - y64)
    assert np.all(err <= bound), (err.max(), bound.flat[np.argmax(err - bound)])
    nz = np.abs(y64) > 0  # the bound is far below the values themselves (all-zero rows aside)
    assert np.median(bound[nz] / np.abs(y64[nz])) < 1e-3


@needs_ffi
def test_int8_gemm_non_finite_x_propagates():
    """NaN/inf in x cannot become digits: the call takes the f32 path and the result is NaN/inf
    where the reference's is."""
    ct = _pack(4, 96, 40, "int8", None)
    x = np.random.default_rng(2).standard_normal((5, 96)).astype(np.float32)
    x[1, 3], x[3, 70] = np.nan, np.inf
    y = np.asarray(jax.jit(lffi.matmul)(jnp.asarray(x), ct))
    want = np.asarray(jnp.asarray(x) @ decompress_reference(ct))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(want))
    np.testing.assert_allclose(y[[0, 2, 4]], want[[0, 2, 4]], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- bad input at the handler
def _raises_xla_error(fn, match="ltjax"):
    with pytest.raises(Exception) as e:
        jax.block_until_ready(fn())
    assert match in str(e.value), str(e.value)


@needs_ffi
def test_bad_input_gives_xla_errors():
    x = jnp.ones((2, 64), jnp.float32)
    codes = jnp.ones((16, 64), jnp.int8)
    scales = jnp.ones((16,), jnp.float32)
    out = jax.ShapeDtypeStruct((2, 16), jnp.float32)
    call = lambda *a: jax.ffi.ffi_call("ltjax_int8_matmul", out)(*a)  # noqa: E731
    _raises_xla_error(lambda: call(x, codes.astype(jnp.int32), scales), "int8")  # wrong dtype
    _raises_xla_error(lambda: call(x[None], codes, scales), "2-D")  # wrong rank
    _raises_xla_error(lambda: call(jnp.ones((2, 63)), codes, scales), "shape")  # K mismatch
    _raises_xla_error(lambda: call(x, codes, jnp.ones((15,))), "shape")  # scales mismatch
    _raises_xla_error(lambda: call(x.astype(jnp.float16), codes, scales), "float32 or bfloat16")
    bad_out = jax.ShapeDtypeStruct((2, 17), jnp.float32)
    _raises_xla_error(lambda: jax.ffi.ffi_call("ltjax_int8_matmul", bad_out)(x, codes, scales), "shape")


@needs_ffi
@pytest.mark.parametrize("damage", ["offsets_big", "offsets_negative", "mask_extra_bits", "values_short"])
def test_damaged_bitmask_is_an_error_not_a_crash(damage):
    ct = _pack(0, 64, 48, "bitmask_int8", (8, 32))
    mask, offsets, codes = np.asarray(ct.mask).copy(), np.asarray(ct.offsets).copy(), np.asarray(ct.codes)
    if damage == "offsets_big":
        offsets[-1] = 10**6
    elif damage == "offsets_negative":
        offsets[1] = -5
    elif damage == "mask_extra_bits":
        mask[-1, :] = 0xFFFFFFFF
    else:
        codes = codes[:-3]
    for m in (2, 1):  # M = 1 takes the GEMV kernel (VNNI where present), which checks spans per row block
        x = jnp.asarray(np.random.default_rng(m).standard_normal((m, 64)).astype(np.float32))
        f = jax.ffi.ffi_call("ltjax_bitmask_int8_matmul", jax.ShapeDtypeStruct((m, 48), jnp.float32))
        _raises_xla_error(lambda: f(x, mask, offsets, codes, ct.scales, tile_rows=8, tile_cols=32), "damaged")
    outu = jax.ShapeDtypeStruct((48, 64), jnp.float32)
    g = jax.ffi.ffi_call("ltjax_bitmask_int8_unpack", outu)
    _raises_xla_error(lambda: g(mask, offsets, codes, ct.scales, tile_rows=8, tile_cols=32), "damaged")


# ---------------------------------------------------------------------- fallback without the extension
@pytest.mark.parametrize("how", ["missing", "disabled"])
def test_fallback_when_extension_absent(how):
    """Simulated absence: the import of `_ltjax_ffi` fails (or is disabled); the package still works,
    `why_not` gives the reason, and `ltjax.matmul` logs it once."""
    code = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="LOG %(message)s", stream=sys.stdout)
        if sys.argv[1] == "missing":
            sys.modules["ltjax.ffi.cpu._ltjax_ffi"] = None  # import of the extension now raises ImportError
        import jax.numpy as jnp, numpy as np
        import ltjax, ltjax.ffi.cpu as F
        from ltjax._format import pack
        assert not F.available()
        print("REASON", F.unavailable_reason())
        ct = pack(np.ones((64, 32), np.float32), "int8")
        x = jnp.ones((2, 64))
        assert F.why_not(x, ct) == F.unavailable_reason() and F.why_not_unpack(ct) == F.unavailable_reason()
        for _ in range(2):
            y = ltjax.matmul(x, ct)  # the XLA path
        np.testing.assert_allclose(y, 64 * np.ones((2, 32)), rtol=1e-5)
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LTJAX_DISABLE_FFI", None)
    if how == "disabled":
        env["LTJAX_DISABLE_FFI"] = "1"
    r = subprocess.run([sys.executable, "-c", code, how], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
    reason = r.stdout.split("REASON ", 1)[1].splitlines()[0]
    want = "not built" if how == "missing" else "LTJAX_DISABLE_FFI"
    assert want in reason
    logged = [ln for ln in r.stdout.splitlines() if ln.startswith("LOG ") and reason in ln]
    assert len(logged) == 1, r.stdout
