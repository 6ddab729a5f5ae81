"""The int4 Pallas kernels (`ltjax.pallas.int4_matmul`, `int4_dequant`): natively on GPU, in interpret mode on CPU.

Values against `ltjax.matmul_reference` (symmetric and asymmetric, 32- and 64-column groups, M = 1 and
16, f32 and bf16 activations), dx and scale / min gradients through ``ltjax.matmul(impl="pallas")``
against ``jax.grad`` of the reference, ``decompress`` bit for bit against
`ltjax.decompress_reference`, the code paths only some block sizes take, the nibble decode (its jnp
recipe, and its inline PTX run instruction by instruction by a small emulator), and the CUDA
lowering (Triton) of the shapes that matter, from any host.
Interpret grids are small: K <= 256, N <= 48.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, make_ct, rand, tolerance

import ltjax
from ltjax import pallas as lp
from ltjax._format import (
    CompressedTensor,
    Header,
    choose_tile,
    decompress_reference,
    expected_arrays,
    int4_nibbles,
    pack,
)
from ltjax.pallas import BlockSizes, _decode

INTERPRET = lp.resolve_interpret(None)
CODECS = ("int4", "int4-asymmetric")
# The tile picks int4's group in `make_ct` (the largest of 32/64/128 dividing K and the tile's columns).
TILE_OF_GROUP = {32: (16, 32), 64: (16, 64)}


def weight(codec, k, n, group, **kw) -> CompressedTensor:
    ct = make_ct(codec, k, n, tile=TILE_OF_GROUP[group], **kw)
    assert ct.header.group == group and ct.header.asymmetric == (codec == "int4-asymmetric")
    return ct


def _grads(matmul, x, ct, c):
    loss = lambda x, ct: jnp.sum(matmul(x, ct).astype(jnp.float32) * c)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(x, ct)


# ------------------------------------------------------------------ values and gradients through the op
@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("codec", CODECS)
def test_matmul_values(codec, group, m, xdtype):
    """Forward and transposed products against the reference, through the kernels and the public op."""
    k, n = 192, 40
    ct = weight(codec, k, n, group)
    x, dy = rand((m, k), xdtype, seed=1), rand((m, n), xdtype, seed=2)
    want = ltjax.matmul_reference(x, ct)
    assert_close(lp.matmul(x, ct, interpret=INTERPRET), want)
    assert_close(lp.matmul_t(dy, ct, interpret=INTERPRET), ltjax.matmul_reference(dy, ct.T))
    assert_close(jax.jit(functools.partial(ltjax.matmul, impl="pallas"))(x, ct), want)


@pytest.mark.parametrize("xdtype,m", [(jnp.float32, 1), (jnp.float32, 16), (jnp.bfloat16, 3)],
                         ids=lambda v: jnp.dtype(v).name if not isinstance(v, int) else str(v))
@pytest.mark.parametrize("codec", CODECS)
def test_gradients(codec, xdtype, m):
    """dx (the transposed kernel) and the scales' (and mins') cotangents through ``ltjax.matmul(impl="pallas")``."""
    k, n = 128, 48
    ct = weight(codec, k, n, 32)
    x, c = rand((m, k), xdtype, seed=3), rand((m, n), seed=4)
    (gx, gct), (rx, rct) = _grads(functools.partial(ltjax.matmul, impl="pallas"), x, ct, c), \
        _grads(ltjax.matmul_reference, x, ct, c)
    assert_close(gx, rx)
    assert_close(gct.scales, rct.scales)
    if ct.mins is not None:
        assert_close(gct.mins, rct.mins)
    assert gct.codes.dtype == jax.dtypes.float0


def test_f16_activations_and_channel_axis_0():
    """f16 x (codes decoded to f16), and a weight stored [K, N] (channel axis 0: the transposed kernel forward)."""
    ct = weight("int4-asymmetric", 128, 40, 32)
    x = rand((5, 128), jnp.float16, seed=5)
    assert_close(lp.matmul(x, ct, interpret=INTERPRET), ltjax.matmul_reference(x, ct))
    ct0 = make_ct("int4", 64, 96, tile=(16, 32), axis=0)  # storage [64, 96]: groups run along N
    assert ct0.header.axis == 0 and ct0.header.group == 32
    for dt in (jnp.float32, jnp.bfloat16):
        x0, dy0 = rand((3, 64), dt, seed=6), rand((3, 96), dt, seed=7)
        assert_close(lp.matmul(x0, ct0, interpret=INTERPRET), ltjax.matmul_reference(x0, ct0))
        assert_close(lp.matmul_t(dy0, ct0, interpret=INTERPRET), ltjax.matmul_reference(dy0, ct0.T))


# ------------------------------------------------------------------ what only some block sizes take
BLOCKS = [
    BlockSizes(block_m=1, block_n=16, block_k=128, split=2),  # batch 1: FMAs, one reduction after the loop
    BlockSizes(block_m=2, block_n=16, block_k=64, split=1),  # the broadcast multiply-reduce
    BlockSizes(block_m=16, block_n=16, block_k=64, split=3),  # dot path, a split reduced axis, a ragged last step
    BlockSizes(block_m=16, block_n=32, block_k=128, split=0),  # dot path, one step per program
]


@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("bs", BLOCKS, ids=lambda b: f"m{b.block_m}n{b.block_n}k{b.block_k}s{b.split}")
def test_block_geometries(bs, codec, xdtype):
    k, n, m = 224, 37, 3  # K: 7 groups of 32, not a multiple of block_k; N ragged
    ct = weight(codec, k, n, 32)
    x, dy = rand((m, k), xdtype, seed=8), rand((m, n), xdtype, seed=9)
    assert_close(lp.int4_matmul(x, ct, interpret=INTERPRET, block_sizes=bs), ltjax.matmul_reference(x, ct))
    assert_close(lp.int4_matmul_t(dy, ct, interpret=INTERPRET, block_sizes=bs), ltjax.matmul_reference(dy, ct.T))


def test_f32_as_bf16_rows():
    """f32 x at M <= 21 runs as the bf16 kernel over its three exact bf16 parts, M > 21 as the kernel's
    own f32 path: both f32-accurate."""
    ct = weight("int4-asymmetric", 128, 40, 32)
    for m in (5, 21, 22):
        x = rand((m, 128), jnp.float32, seed=m)
        y = lp.int4_matmul(x, ct, interpret=INTERPRET)
        assert y.dtype == jnp.float32
        assert_close(y, ltjax.matmul_reference(x, ct), rel=tolerance(jnp.float32))


def test_block_k_follows_the_group():
    """``block_k`` a multiple of the group: a tuned row narrower than it is widened, explicit blocks refused."""
    ct = weight("int4", 128, 40, 64)
    x = rand((2, 128), jnp.bfloat16, seed=10)
    assert lp._config.fit_group(BlockSizes(block_k=32), 64, explicit=False).block_k == 64
    with pytest.raises(ValueError, match="multiple of the scale group"):
        lp.int4_matmul(x, ct, interpret=INTERPRET, block_sizes=BlockSizes(block_k=32))
    for kernel in ("int4_matmul", "int4_matmul_t", "int4_dequant", "int4_dequant_t"):
        for m in (1, 16, 64, 1000):
            for dt in (None, jnp.float32, jnp.bfloat16):
                bs = lp.get_block_sizes(kernel, m, dt)
                assert bs.block_k % 32 == 0 and bs.mosaic is None, (kernel, m, dt, bs)


def test_empty_and_zero_weight():
    ct = pack(np.zeros((64, 8), np.float32), "int4", group=32)
    x = rand((2, 64), jnp.float32, seed=11)
    np.testing.assert_array_equal(np.asarray(lp.matmul(x, ct, interpret=INTERPRET)), np.zeros((2, 8), np.float32))
    assert lp.matmul(jnp.zeros((0, 64)), ct, interpret=INTERPRET).shape == (0, 8)


# ------------------------------------------------------------------ decompress, bit for bit
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape,axis,dtype", [((96, 45), "default", np.float32),  # axis 1: written transposed
                                              ((64, 96), 0, np.float32),  # storage [K, N]: written as stored
                                              ((4, 64, 6), 2, np.float32),  # N-D
                                              ((96, 45), "default", jnp.bfloat16)])
def test_decompress_bit_exact(codec, shape, axis, dtype):
    """The kernel decodes in f32 by the format's rule, then rounds: the reference's values, bit for bit."""
    w = np.random.default_rng(12).standard_normal(shape).astype(np.float32)
    ct = pack(w.astype(dtype), "int4", group=32, asymmetric=codec == "int4-asymmetric", tile=(16, 32), axis=axis)
    got, want = lp.decompress(ct, interpret=INTERPRET), decompress_reference(ct)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16 if got.dtype.itemsize == 2 else np.uint32),
                                  np.asarray(want).view(np.uint16 if want.dtype.itemsize == 2 else np.uint32))
    d = ltjax.decompress(ct, impl="pallas")  # through the op (its VJP, its dispatch)
    np.testing.assert_array_equal(np.asarray(d), np.asarray(want))


# ------------------------------------------------------------------ the nibble decode
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_nibbles(dtype):
    """Every byte decodes to ``q - 8`` of both nibbles (low: even column), exactly, in the kernels' jnp
    recipe; and the inline PTX's constants are the same recipe's: 1.0 and -(MAGIC + 8) as packed pairs."""
    codes = jnp.arange(256, dtype=jnp.uint8).reshape(16, 16)
    lo, hi = _decode.nibbles(codes, dtype, native=False)
    q = np.asarray(int4_nibbles(codes)).reshape(16, 16, 2)
    np.testing.assert_array_equal(np.asarray(lo.astype(jnp.float32)), q[..., 0] - 8.0)
    np.testing.assert_array_equal(np.asarray(hi.astype(jnp.float32)), q[..., 1] - 8.0)
    lo32, hi32 = _decode.nibbles_f32(codes)
    np.testing.assert_array_equal(np.asarray(lo32), q[..., 0] - 8.0)
    np.testing.assert_array_equal(np.asarray(hi32), q[..., 1] - 8.0)
    magic, magic_value, one, bias, _ = _decode._NIBBLE_FLOAT[jnp.dtype(dtype)]
    half = lambda bits: float(np.array([bits & 0xFFFF], np.uint16).view(jnp.dtype(dtype))[0])  # noqa: E731
    assert half(magic) == magic_value and half(magic | 15) == magic_value + 15
    assert one >> 16 == one & 0xFFFF and half(one) == 1.0
    assert bias >> 16 == bias & 0xFFFF and half(bias) == -(magic_value + 8.0)
    ptx = _decode._nibble_ptx(4, dtype)
    assert f"{magic * 0x10001:#010x}" in ptx and f"{bias:#010x}" in ptx and "shr.b32 w, $2, 4;" in ptx


def _run_ptx(ptx: str, word: int, dtype) -> list[float]:
    """The nibble PTX on one register of four code bytes, instruction by instruction (PTX ISA semantics
    of mov / shr / prmt / lop3 / fma on packed pairs), under Triton's packing of ``pack=4``: byte i is
    element i, and result element i is half i of ($0, $1), low half first."""
    regs, to_int = {"$2": word}, lambda v: int(v, 0)
    val = lambda t: regs[t] if t in regs else to_int(t)  # noqa: E731
    half = lambda bits: float(np.array([bits], np.uint16).view(jnp.dtype(dtype))[0])  # noqa: E731
    bits_of = lambda f: int(np.array([f], jnp.dtype(dtype)).view(np.uint16)[0])  # noqa: E731
    for line in ptx.splitlines():
        m = re.match(r"([\w.]+) ([^;]*);", line.strip())
        if not m or m.group(1) == ".reg":
            continue
        op, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        d, src = args[0], [val(a) for a in args[1:]]
        if op == "mov.b32":
            regs[d] = src[0]
        elif op == "shr.b32":
            regs[d] = src[0] >> src[1]
        elif op == "prmt.b32":  # result byte i: byte (selector nibble i) of the 8 bytes {b, a}
            pool = (src[1] << 32 | src[0]).to_bytes(8, "little")
            regs[d] = int.from_bytes(bytes(pool[(src[2] >> 4 * i) & 7] for i in range(4)), "little")
        elif op == "lop3.b32":
            assert src[3] == 0xEA  # (a & b) | c
            regs[d] = (src[0] & src[1]) | src[2]
        elif op.startswith("fma.rn."):  # per 16-bit half, exact here (small integers)
            h = lambda v, i: half((v >> 16 * i) & 0xFFFF)  # noqa: E731
            regs[d] = sum(bits_of(h(src[0], i) * h(src[1], i) + h(src[2], i)) << 16 * i for i in range(2))
        else:
            raise AssertionError(f"unexpected PTX {line!r}")
    return [half((regs[r] >> 16 * i) & 0xFFFF) for r in ("$0", "$1") for i in range(2)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_nibble_ptx_recipe(dtype):
    """The inline PTX, run instruction by instruction on every byte value in every lane: element i of
    the result is ``q - 8`` of byte i's low (shift 0) or high (shift 4) nibble."""
    for v in range(256):
        lanes = [(v + 37 * i) % 256 for i in range(4)]
        word = int.from_bytes(bytes(lanes), "little")
        assert _run_ptx(_decode._nibble_ptx(0, dtype), word, dtype) == [(b & 15) - 8.0 for b in lanes]
        assert _run_ptx(_decode._nibble_ptx(4, dtype), word, dtype) == [(b >> 4) - 8.0 for b in lanes]


# ------------------------------------------------------------------ CUDA lowering (on any host) and dispatch
_NEEDS_GPU_TO_LOWER = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11)
TRITON = "__gpu$xla.gpu.triton"


def abstract_int4(k: int, n: int, group: int, asymmetric: bool) -> CompressedTensor:
    """A [K, N] Dense kernel's int4 tensor of shapes only (no packing): for lowering large weights."""
    h = Header("int4", (k, n), "float32", 1, choose_tile((n, k), None), group=group, asymmetric=asymmetric)
    arrays = {f: jax.ShapeDtypeStruct(s, d) for f, (s, d) in expected_arrays(h, None).items()}
    return CompressedTensor(header=h, **arrays)


def _lowered_kernels(fn, *args) -> list[str]:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert TRITON in text
    return re.findall(r'name = "(ltjax_[a-z0-9_]+)"', text)


# 8192² (an 8B model's square projection) at M = 1 and 16; SmolLM2-135M's MLP: [576, 1536] and [1536, 576].
LOWER_SHAPES = [(8192, 8192, 32, False), (8192, 8192, 128, True), (576, 1536, 32, True), (1536, 576, 32, False)]


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k,n,group,asym", LOWER_SHAPES, ids=lambda v: str(v))
def test_kernels_lower_for_cuda(k, n, group, asym, m):
    if _NEEDS_GPU_TO_LOWER and jax.default_backend() != "gpu":
        pytest.skip(f"jax {jax.__version__} lowers Pallas-Triton kernels only with a GPU present")
    ct = abstract_int4(k, n, group, asym)
    for dt in (jnp.bfloat16, jnp.float32):
        x, dy = jax.ShapeDtypeStruct((m, k), dt), jax.ShapeDtypeStruct((m, n), dt)
        assert "ltjax_int4_matmul" in _lowered_kernels(functools.partial(lp.matmul, interpret=False), x, ct)
        assert "ltjax_int4_matmul_t" in _lowered_kernels(functools.partial(lp.matmul_t, interpret=False), dy, ct)
    if m == 1:
        assert "ltjax_int4_dequant" in _lowered_kernels(functools.partial(lp.decompress, interpret=False), ct)


@pytest.mark.parametrize("codec", CODECS)
def test_explain_for_cuda_picks_pallas(codec):
    ct = weight(codec, 96, 45, 32)
    for m in (1, 16):
        e = ltjax.explain(jax.ShapeDtypeStruct((m, 96), jnp.bfloat16), ct, platform="cuda")
        assert (e.impl, e.backward) == ("pallas", "dx: pallas"), str(e)
    assert lp.can_use_pallas(jnp.zeros((2, 96)), ct, interpret=True)
    assert lp.kernel_backend(jnp.zeros((2, 96)), ct) == "triton"
    assert "int4" in lp.MATMUL_CODECS and "int4" in lp.DECOMPRESS_CODECS
