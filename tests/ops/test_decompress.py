"""`ltjax.decompress`: one battery over every implementation in `ltjax.ops.decompress.IMPLEMENTATIONS`.

Each runs through the public function (``ltjax.decompress(ct, impl=name)``; ``None``: the
default dispatch): values bit-exact against `ltjax.decompress_reference`, the VJP against
``jax.grad`` of the reference, jit, stacked tensors and vmap. The Pallas kernels run in
interpret mode off a GPU; an implementation that cannot run here is skipped with the
registry's reason, and one that refuses a codec must say why.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import WEIGHTS, assert_close, holds, make_ct, pack_weight, rand, random_weight

import ltjax
import ltjax._config
from ltjax._format import CODECS
from ltjax.ops.decompress import IMPLEMENTATIONS

IMPLS = tuple(i.name for i in IMPLEMENTATIONS) + (None,)  # None: what ltjax.decompress picks by itself
reference = jax.jit(ltjax.decompress_reference)  # one compile per shape, not one per primitive
# Run on the battery's few marked cases only: Pallas in interpret mode (slow on a CPU; natively
# it runs every case); the reference, whose values are its own (forcing it still checks the
# wiring and the VJP); and the default dispatch (None), which runs one of the others.
FEWER = {"reference", None} | ({"pallas"} if ltjax._config.host_platform() not in ("cuda", "rocm") else set())


@dataclasses.dataclass(frozen=True)
class Case:
    """A weight of ``shape`` and ``dtype`` with channel axis ``axis``, cut into ``tile``."""

    shape: tuple[int, ...]
    tile: tuple[int, int] | None
    dtype: str = "float32"
    axis: int | str = "default"
    signed_zeros: bool = False  # some zeros stored as -0.0 (bitmask keeps them, bit for bit)
    few: bool = False  # one of the few cases `FEWER` run

    def __str__(self) -> str:
        extra = ("" if self.axis == "default" else f"-axis{self.axis}") + ("-signed0" if self.signed_zeros else "")
        return f"{'x'.join(map(str, self.shape))}-t{self.tile}-{self.dtype}{extra}"

    def ct(self, codec: str):
        w = random_weight(self.shape, dtype=np.float32)
        if self.signed_zeros:
            w.reshape(-1)[::7] = -0.0
        return pack_weight(w.astype(jnp.dtype(self.dtype)), codec, tile=self.tile, axis=self.axis)


CASES = [
    Case((80, 45), (16, 32), few=True),  # ragged tiles both ways, K not a multiple of the 32-bit mask word
    Case((300, 130), None),  # the default tile
    Case((33, 64), (8, 33), "bfloat16", few=True),  # one tile spanning a row that is not a multiple of 32
    Case((64, 48), (16, 32), "float16", signed_zeros=True, few=True),
    Case((64, 48), (16, 32), axis=0),  # stored [K, N]
    Case((6, 40, 5), (8, 96), axis=1, few=True),  # N-D, a middle channel axis
    Case((96, 45), (16, 32), few=True),  # 32-column groups (int4's scale groups: most others cannot hold int4)
    Case((4, 64, 6), (16, 32), axis=2),  # N-D with int4 groups
]


def declared_codecs(impl: str | None) -> tuple[str, ...]:
    """The codecs ``impl`` says it decodes (its backend's own constant): it must run every one of
    them, and refuse the others with a reason."""
    if impl == "pallas":
        from ltjax import pallas
        return pallas.DECOMPRESS_CODECS
    if impl == "ffi":
        from ltjax.ffi import cpu
        return cpu.UNPACK_CODECS
    return CODECS  # xla, reference, the default dispatch: every codec


def refusals(impl: str | None, codec: str) -> list[str]:
    """The reasons ``impl`` must give for refusing ``codec`` (`CompressedTensor.codec`; any of
    them): empty where it must run it."""
    return [] if codec in declared_codecs(impl) else [f"not '{codec}'"]


def weights_and(cases) -> list:
    """(codec, case) for each of `WEIGHTS` and each case the codec can hold (int4: its scale groups)."""
    return [pytest.param(c, case, id=f"{c}-{case}") for c in WEIGHTS for case in cases
            if holds(c, case.shape, tile=case.tile, axis=case.axis)]


@functools.cache
def cannot_run_here(impl: str | None) -> str | None:
    """Why ``impl`` cannot run at all on this host (the registry's reason), None if it can."""
    if impl is None:
        return None
    try:
        ltjax.decompress(make_ct("bitmask_int8", 64, 32), impl=impl)  # a codec every implementation takes
    except ValueError as e:
        return str(e)
    return None


def require(impl: str | None, case: Case | None = None) -> None:
    why = cannot_run_here(impl)
    if why is not None:
        pytest.skip(why)
    if case is not None and impl in FEWER and not case.few:
        pytest.skip(f"impl={impl!r} runs the battery's few marked cases only here")


def _expect_refusal(impl, ct, f, *args) -> bool:
    why = refusals(impl, ct.codec)
    if not why:
        return False
    with pytest.raises(ValueError, match=rf"impl='{impl}' cannot run decompress here: .*({'|'.join(why)})"):
        f(*args)
    return True


def _decompress(impl):
    return lambda ct: ltjax.decompress(ct, impl=impl)


def _ids(v):
    return "auto" if v is None else str(v)


def assert_bits_equal(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    if got.tobytes() != want.tobytes():
        bad = np.flatnonzero(got.reshape(-1).view(f"u{got.itemsize}") != want.reshape(-1).view(f"u{got.itemsize}"))
        raise AssertionError(f"{bad.size} of {got.size} elements differ in their bits, first at flat index "
                             f"{bad[0]}: {got.reshape(-1)[bad[0]]!r} vs {want.reshape(-1)[bad[0]]!r}")


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("codec,case", weights_and(CASES))
@pytest.mark.parametrize("impl", IMPLS, ids=_ids)
def test_values(impl, codec, case):
    require(impl, case)
    ct = case.ct(codec)
    f = jax.jit(_decompress(impl))
    if _expect_refusal(impl, ct, f, ct):
        return
    assert_bits_equal(f(ct), reference(ct))


# ------------------------------------------------------------------ the VJP
def _grads(decompress, ct, c):
    loss = lambda ct: jnp.sum(decompress(ct).astype(jnp.float32) * c)  # noqa: E731
    return jax.jit(jax.grad(loss, allow_int=True))(ct)


def _vjp_cases():
    """The default dispatch on four geometries; each forced implementation on one (the backward
    is one rule for all of them; what differs is the forward under it, which test_values checks)."""
    every = weights_and([CASES[0], CASES[2], CASES[5], CASES[6]])
    one = weights_and([CASES[6]])
    return [pytest.param(None, *p.values, id=f"auto-{p.id}") for p in every] + \
           [pytest.param(impl, *p.values, id=f"{impl}-{p.id}") for impl in IMPLS if impl is not None for p in one]


@pytest.mark.parametrize("impl,codec,case", _vjp_cases())
def test_vjp(impl, codec, case):
    """Cotangents of the float leaves (scales and mins; values of raw and bitmask) against the
    reference's autodiff; float0 zeros for the integer leaves."""
    require(impl, case)
    ct = case.ct(codec)
    c = rand(case.shape, seed=3)
    if _expect_refusal(impl, ct, _grads, _decompress(impl), ct, c):
        return
    g, r = _grads(_decompress(impl), ct, c), _grads(ltjax.decompress_reference, ct, c)
    for name, a in ct.leaves().items():
        if jnp.issubdtype(a.dtype, jnp.floating):
            assert_close(getattr(g, name), getattr(r, name))
        else:
            assert getattr(g, name).dtype == jax.dtypes.float0 and getattr(g, name).shape == np.shape(a), name


# ------------------------------------------------------------------ stacked tensors and vmap
@pytest.mark.parametrize("codec", WEIGHTS)
@pytest.mark.parametrize("impl", IMPLS, ids=_ids)
def test_stacked_and_vmap(impl, codec):
    """A stacked tensor (nn.scan layers) decodes layer by layer; vmap over a stack does the same,
    and (the default dispatch) its VJP is the reference's."""
    require(impl)
    stack = make_ct(codec, 96, 45, tile=(16, 32), stack=(2, 3))
    if _expect_refusal(impl, stack, _decompress(impl), stack):
        return
    want = reference(stack)
    assert want.shape == (2, 3, 96, 45)
    assert_bits_equal(jax.jit(_decompress(impl))(stack), want)
    flat = jax.tree.map(lambda a: a.reshape((6,) + a.shape[2:]), stack)
    assert_bits_equal(jax.jit(jax.vmap(_decompress(impl)))(flat), want.reshape(6, 96, 45))
    if impl is not None:
        return
    c = rand((2, 3, 96, 45), seed=4)
    g, r = _grads(_decompress(impl), stack, c), _grads(ltjax.decompress_reference, stack, c)
    for name, a in stack.leaves().items():
        if jnp.issubdtype(a.dtype, jnp.floating):
            assert_close(getattr(g, name), getattr(r, name))


# ------------------------------------------------------------------ dispatch
@pytest.mark.parametrize("codec", WEIGHTS)
def test_default_here(codec):
    """On one CPU device with the handlers built, the codecs they unpack run in their custom call;
    the others, and elsewhere, on the XLA path (no custom call of ltjax's own)."""
    ct = make_ct(codec, 96, 45, tile=(16, 32))
    host = ltjax._config.host_platform()
    text = jax.jit(ltjax.decompress).trace(ct).lower(lowering_platforms=(host,)).as_text()
    targets = set(re.findall(r"stablehlo.custom_call @(ltjax_\w+)", text))
    ffi = host == "cpu" and jax.device_count() == 1 and cannot_run_here("ffi") is None
    unpacked = ffi and make_ct(codec, 96, 45, tile=(16, 32)).codec in declared_codecs("ffi")
    assert (len(targets) == 1 and next(iter(targets)).endswith("_unpack")) if unpacked else not targets, targets
    assert_bits_equal(ltjax.decompress(ct), ltjax.decompress_reference(ct))


def test_unknown_and_bad_input():
    ct = make_ct("int8", 64, 32)
    with pytest.raises(ValueError, match=r"impl='bogus' is not an implementation of decompress; choose one of "
                                         r"\('pallas', 'ffi', 'xla', 'reference'\) or None"):
        ltjax.decompress(ct, impl="bogus")
    with pytest.raises(ValueError, match="impl='cuda' is not an implementation of decompress"):
        ltjax.decompress(ct, impl="cuda")
    with pytest.raises(ValueError, match="ltjax.decompress needs a CompressedTensor, got ndarray"):
        ltjax.decompress(np.ones((4, 4)))
