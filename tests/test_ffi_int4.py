"""The CPU handlers' int4 kernels (ltjax.ffi.cpu, int4_matmul.cc / int4_unpack.cc) against the reference.

Values against `ltjax.matmul_reference` for every group and both rules, f32 and bf16 x, M = 1 (the
GEMV: exact integer sums against x as 24-bit fixed point, vpdpbusd on AVX-512 VNNI, vpmaddubsw on
AVX2; with LTJAX_FFI_VNNI=0 or NaN/inf in x the f32 walk), 3, 16 and 64 (four decoded rows at a
time through the shared micro-kernel), K with a partial 128-column block, N with row tails and
large enough to be split across the pool, tiles that cut rows; the transposed product; unpack bit
for bit; the GEMV's stated error against float64; gradients through ``ltjax.matmul(impl="ffi")``;
bad input. In subprocesses: the whole module on the AVX2 kernels, and the GEMV tests on both f32
walks (LTJAX_FFI_VNNI=0, AVX-512 and AVX2).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, rand, random_weight, rerun_module

import ltjax
import ltjax.ffi.cpu as lffi
from ltjax._config import settings
from ltjax._format import decode_storage, decompress_reference, int4_nibbles, pack

needs_ffi = pytest.mark.skipif(not lffi.available(), reason=f"ltjax.ffi.cpu unavailable: {lffi.unavailable_reason()}")
RULES = [False, True]  # asymmetric: (q - 8) * s, or q * s + m


def int4(k: int, n: int, group: int, asymmetric: bool, *, tile=None, dtype=np.float32, sparsity: float = 0.1):
    """A logical [K, N] weight of fresh random values (a few exact zeros) packed as int4."""
    w = random_weight((k, n), sparsity=sparsity, seed=k * 1009 + n * 7 + group + asymmetric)
    return pack(w.astype(dtype), "int4", tile=tile, group=group, asymmetric=asymmetric)


# (K, N, M, tile) per group: K with a partial 128-column block where the group allows it (the VNNI
# GEMV's masked tail), N = 7 / 77 leave rows after the blocks of four, N = 300 is split across the
# pool, 7-row tiles and tile columns that cut the row.
SHAPES = {
    32: [(160, 77, 1, (7, 64)), (224, 300, 3, None), (1056, 300, 1, (16, 96)), (96, 7, 16, None), (160, 45, 64, None)],
    64: [(320, 77, 1, (7, 128)), (192, 300, 16, None), (1024, 300, 1, None), (64, 7, 3, None), (320, 45, 64, None)],
    128: [(384, 77, 1, (7, 128)), (256, 300, 3, None), (1152, 300, 1, (16, 256)), (128, 7, 16, None),
          (384, 45, 64, None)],
}
CASES = [pytest.param(g, *s, id=f"g{g}-{s[0]}x{s[1]}-{'gemv' if s[2] == 1 else f'm{s[2]}'}-t{s[3]}")
         for g, shapes in SHAPES.items() for s in shapes]


@needs_ffi
@pytest.mark.parametrize("group,k,n,m,tile", CASES)
@pytest.mark.parametrize("asymmetric", RULES, ids=["sym", "asym"])
@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_matmul_and_transposed_match_reference(group, k, n, m, tile, asymmetric, xdtype):
    ct = int4(k, n, group, asymmetric, tile=tile)
    x, dy = rand((m, k), xdtype, seed=m), rand((m, n), xdtype, seed=m + 1)
    assert lffi.why_not(x, ct) is None
    assert_close(jax.jit(lffi.matmul)(x, ct), ltjax.matmul_reference(x, ct))
    assert_close(jax.jit(lffi.matmul_t)(dy, ct), ltjax.matmul_reference(dy, ct.T))


@needs_ffi
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("asymmetric", RULES, ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16], ids=["f32", "bf16", "f16"])
def test_unpack_is_bit_exact(group, asymmetric, dtype):
    """Each f32 weight is exact or rounded once, as in the reference decoder, then rounded to the
    tensor's dtype: the same bits."""
    ct = int4(256, 40, group, asymmetric, tile=(16, 128), dtype=dtype)
    got, want = np.asarray(jax.jit(lffi.unpack)(ct)), np.asarray(decode_storage(ct))
    assert got.dtype == want.dtype and got.shape == want.shape == (40, 256)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


# ---------------------------------------------------------------------- the M = 1 GEMV's error
def _gemv_bound(ct, x64, y64) -> np.ndarray:
    """Largest |y - y_exact| a correct GEMV may give (docs/ffi.md "int4"): f32 roundings, at most
    ``depth`` deep, of terms no larger than the path's own, so depth * 2^-24 * their sum to first
    order (1% added for the rest), and one rounding of y.

    * Integer sums (the default): exact sums of (q - 8) e per 8 columns, one conversion and one FMA
      per lane per block (128 columns, or 64 on AVX2), the lanes, and (asymmetric) the midpoints
      m + 8 s and their term: terms |(q - 8) s x| and |m + 8 s| |x|; plus the rounding of x to its
      24-bit grid, (qs / 2) * sum_k |w_k| with qs = max|x| / 8355711.
    * The f32 walk (LTJAX_FFI_VNNI=0): each weight decoded exactly as the reference's, products
      |w x|, K / 32 FMAs per lane (AVX-512; K / 16 on AVX2), then the partial sums."""
    h = ct.header
    k, g = h.storage_shape[1], h.group
    w = np.asarray(decode_storage(ct), np.float64)
    ax = np.abs(x64)
    avx512 = lffi.info()["isa"] == "avx512"
    if settings().ffi_vnni is not False:
        s = np.asarray(ct.scales, np.float64)
        q = np.asarray(int4_nibbles(ct.codes), np.float64)  # [N, K]
        terms = (np.abs(q - 8) * np.repeat(np.abs(s), g, axis=1)) @ ax
        if h.asymmetric:
            terms += np.repeat(np.abs(np.asarray(ct.mins, np.float64) + 8 * s), g, axis=1) @ ax
        depth = -(-k // (128 if avx512 else 64)) + h.groups // (16 if avx512 else 8) + 12
        extra = np.abs(w).sum(axis=1) * ax.max() / 8355711 / 2
    else:
        terms, extra = np.abs(w) @ ax, 0.0
        depth = -(-k // (32 if avx512 else 16)) + 12
    return terms * depth * 2.0**-24 * 1.01 + np.abs(y64) * 2.0**-23 + extra + 1e-30


# (group, K, N): K = 4096 split across the pool; K with a partial 128-column block (not for G = 128,
# whose K is a whole number of blocks); a short row.
GEMV_CASES = [(32, 4096, 300), (32, 1056, 77), (32, 160, 33), (64, 4096, 300), (64, 1088, 77), (64, 192, 33),
              (128, 4096, 300), (128, 1152, 77), (128, 128, 33)]


@needs_ffi
@pytest.mark.parametrize("group,k,n", GEMV_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("asymmetric", RULES, ids=["sym", "asym"])
@pytest.mark.parametrize("outliers", [False, True], ids=["normal", "outliers"])
def test_gemv_within_stated_error(group, k, n, asymmetric, outliers):
    """M = 1 (exact integer sums against x as 24-bit fixed point; with LTJAX_FFI_VNNI=0 the f32
    walk) against a float64 product of the decoded weight, within the bound docs/ffi.md states, and
    that bound far below the values themselves. Outliers: LLM-like x, a few channels 100x."""
    ct = int4(k, n, group, asymmetric)
    rng = np.random.default_rng(k + n + group)
    x = rng.standard_normal((1, k)).astype(np.float32)
    if outliers:
        x[0, rng.choice(k, max(1, k // 100), replace=False)] *= 100.0
    x64 = x[0].astype(np.float64)
    y64 = np.asarray(decode_storage(ct), np.float64) @ x64
    y = np.asarray(jax.jit(lffi.matmul)(jnp.asarray(x), ct), np.float64)[0]
    bound = _gemv_bound(ct, x64, y64)
    err = np.abs(y - y64)
    assert np.all(err <= bound), (err.max(), bound[np.argmax(err - bound)])
    # not vacuous: far below the values themselves (loose by the worst-case depth; the AVX2 walk's deepest)
    assert np.median(bound / np.maximum(np.abs(y64), 1e-30)) < 2e-3


@needs_ffi
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("m", [1, 3])
def test_non_finite_x_propagates_gemv(bad, m):
    """x with NaN/inf cannot be written as integer digits: the f32 walk runs (its products are the
    decoded weight times x, as the reference's), so NaN/inf land where the reference puts them."""
    ct = int4(256, 40, 64, False)
    x = np.random.default_rng(1).standard_normal((m, 256)).astype(np.float32)
    x[0, 5] = bad
    y = np.asarray(jax.jit(lffi.matmul)(jnp.asarray(x), ct))
    want = np.asarray(jnp.asarray(x) @ decompress_reference(ct))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(want))
    assert_close(y[1:], want[1:])


# ---------------------------------------------------------------------- through the op layer
@needs_ffi
@pytest.mark.parametrize("asymmetric", RULES, ids=["sym", "asym"])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gradients_through_the_public_op(asymmetric, m):
    """``ltjax.matmul(impl="ffi")``: dx from the transposed handler, the scales' (and mins')
    cotangents from the op layer's own per-group sums, against ``jax.grad`` of the reference."""
    ct = jax.tree.map(jnp.asarray, int4(320, 77, 64, asymmetric, tile=(16, 128)))
    x, c = rand((m, 320)), rand((m, 77), seed=9)
    e = ltjax.explain(x, ct)
    assert (e.impl, e.backward) == ("ffi", "dx: ffi"), str(e)

    def grads(matmul):
        loss = lambda x, ct: jnp.sum(matmul(x, ct) * c)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(x, ct)

    (gx, gct), (rx, rct) = grads(lambda x, ct: ltjax.matmul(x, ct, impl="ffi")), grads(ltjax.matmul_reference)
    assert_close(gx, rx)
    for name in ("scales", "mins") if asymmetric else ("scales",):
        assert_close(getattr(gct, name), getattr(rct, name))


@needs_ffi
@pytest.mark.parametrize("m,want", [(1, "ffi"), (64, "ffi"), (256, "ffi"), (257, "xla")])
def test_explain_picks_the_handlers_up_to_256_rows(m, want):
    ct = int4(256, 64, 64, False)
    e = ltjax.explain(jax.ShapeDtypeStruct((m, 256), jnp.float32), ct)
    assert e.impl == want, str(e)
    assert e.reasons["ffi"] is None if want == "ffi" else "M=257 > 256" in e.reasons["ffi"], str(e)
    assert lffi.why_not_unpack(ct) is None


@needs_ffi
def test_no_dense_temp():
    ct = int4(1024, 1024, 64, True)
    for m in (1, 16):
        temp = jax.jit(lffi.matmul).lower(jnp.ones((m, 1024)), ct).compile().memory_analysis().temp_size_in_bytes
        assert temp < 1024 * 1024, temp  # a dense f32 weight would be 4 MiB


# ---------------------------------------------------------------------- bad input at the handler
def _raises_xla_error(fn, match):
    with pytest.raises(Exception) as e:
        jax.block_until_ready(fn())
    assert match in str(e.value), str(e.value)


@needs_ffi
def test_bad_input_gives_xla_errors():
    x = jnp.ones((2, 128), jnp.float32)
    codes, scales, mins = jnp.ones((16, 64), jnp.uint8), jnp.ones((16, 2), jnp.float16), jnp.ones((16, 2), jnp.float16)
    out = jax.ShapeDtypeStruct((2, 16), jnp.float32)
    call = lambda *a: jax.ffi.ffi_call("ltjax_int4_matmul", out)(*a)  # noqa: E731
    asym = lambda *a: jax.ffi.ffi_call("ltjax_int4_asym_matmul", out)(*a)  # noqa: E731
    _raises_xla_error(lambda: call(x, codes.astype(jnp.int8), scales), "codes must be uint8")
    _raises_xla_error(lambda: call(x, codes, scales.astype(jnp.float32)), "scales must be float16")
    _raises_xla_error(lambda: call(x, codes, jnp.ones((16, 8), jnp.float16)), "groups G of 32, 64 or 128")
    _raises_xla_error(lambda: call(x, codes, jnp.ones((15, 2), jnp.float16)), "scales has shape")
    _raises_xla_error(lambda: call(jnp.ones((2, 127)), codes, scales), "x has shape")
    _raises_xla_error(lambda: call(x.astype(jnp.float16), codes, scales), "float32 or bfloat16")
    _raises_xla_error(lambda: asym(x, codes, scales, mins[:, :1]), "mins has shape")
    _raises_xla_error(lambda: asym(x, codes, scales, mins.astype(jnp.bfloat16)), "mins must be float16")
    bad_out = jax.ShapeDtypeStruct((2, 17), jnp.float32)
    _raises_xla_error(lambda: jax.ffi.ffi_call("ltjax_int4_matmul", bad_out)(x, codes, scales), "y has shape")
    bad_dx = jax.ShapeDtypeStruct((2, 130), jnp.float32)
    _raises_xla_error(lambda: jax.ffi.ffi_call("ltjax_int4_matmul_t", bad_dx)(jnp.ones((2, 16)), codes, scales),
                      "dx has shape")
    _raises_xla_error(lambda: jax.ffi.ffi_call("ltjax_int4_unpack", jax.ShapeDtypeStruct((16, 128), jnp.int8))(
        codes, scales), "out must be float32, bfloat16 or float16")


# ---------------------------------------------------------------------- the other kernels
# (environment, tests, at least this many passed): the whole module on AVX2 (its row decode and its
# integer GEMV); the GEMV tests (ids with "gemv") on the f32 walks, AVX-512 and AVX2.
OTHER_KERNELS = [({"LTJAX_FFI_ISA": "avx2"}, "not test_whole_module_again", 100),
                 ({"LTJAX_FFI_VNNI": "0"}, "gemv or isa_override", 40),
                 ({"LTJAX_FFI_ISA": "avx2", "LTJAX_FFI_VNNI": "0"}, "gemv or isa_override", 40)]


@needs_ffi
@pytest.mark.parametrize("env,select,at_least", OTHER_KERNELS, ids=["avx2", "f32-walk", "avx2-f32-walk"])
def test_whole_module_again_on_the_other_kernels(env, select, at_least):
    """This module once more on the kernels this CPU would otherwise skip: AVX2 (CPUs without
    AVX-512), and the GEMV's f32 walks (LTJAX_FFI_VNNI=0: the path NaN/inf in x takes, and with
    the setting, the only one). The choice is fixed when the library loads, so in a fresh process;
    `test_isa_override_is_honoured` there proves the override took."""
    rerun_module(__file__, env, select, at_least)


@needs_ffi
def test_isa_override_is_honoured():
    info = lffi.info()
    if os.environ.get("LTJAX_FFI_ISA") == "avx2":
        assert info["isa"] == "avx2" and info["vnni"] != "avx512_vnni", info
    if os.environ.get("LTJAX_FFI_VNNI") == "0":
        assert info["vnni"] is False, info
