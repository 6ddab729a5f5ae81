"""`ltjax.matmul`: one battery over every implementation in `ltjax.ops.matmul.IMPLEMENTATIONS`.

Each runs through the public function (``ltjax.matmul(x, ct, impl=name)``; ``None``: the
default dispatch): values against `ltjax.matmul_reference`, gradients through the public VJP
against ``jax.grad`` of the reference, jit and vmap. Off their platform the Pallas kernels run
in interpret mode and the CUDA kernels in their CPU emulation (where the test install built
it). An implementation that cannot run here at all is skipped with the reason the registry
gives; one that refuses a case must say why (`refusals` states each implementation's contract).
Then the dispatch: `ltjax.explain`, forced implementations, the logged fallback, bad input.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import WEIGHTS, assert_close, holds, make_ct, rand

import ltjax
import ltjax._config
import ltjax.ffi.cpu
from ltjax._format import CODECS
from ltjax.ops.matmul import IMPLEMENTATIONS, TRANSPOSES

IMPLS = tuple(i.name for i in IMPLEMENTATIONS) + (None,)  # None: what ltjax.matmul picks by itself
reference = jax.jit(ltjax.matmul_reference)  # one compile per shape, not one per primitive
# Run on the battery's few marked cases only: Pallas in interpret mode (slow on a CPU; natively
# it runs every case); the reference, whose values are its own (forcing it still checks the
# wiring and the VJP); and the default dispatch (None), which runs one of the others.
FEWER = {"reference", None} | ({"pallas"} if ltjax._config.host_platform() not in ("cuda", "rocm") else set())


@dataclasses.dataclass(frozen=True)
class Case:
    """One call: x[*batch, K] in ``xdtype`` @ a [K, N] weight of ``wdtype`` cut into ``tile``."""

    k: int
    n: int
    tile: tuple[int, int] | None
    batch: tuple[int, ...]
    xdtype: str = "float32"
    wdtype: str = "float32"
    few: bool = False  # one of the few cases `FEWER` run

    @property
    def m(self) -> int:
        return int(np.prod(self.batch))

    def __str__(self) -> str:
        w = "" if self.wdtype == "float32" else f"-w{self.wdtype}"
        return f"{self.k}x{self.n}-t{self.tile}-x{list(self.batch)}-{self.xdtype}{w}"


# Geometries: ragged tiles both ways with K a multiple of 16 but not of the 32-bit mask word;
# the default tile; one tile spanning a row that is not a multiple of 32; tile columns of three
# mask words (the CUDA kernels refuse them); N above the XLA path's 256-row forward chunk; K and
# tile columns in 32-column groups (int4's scale groups: the other geometries cannot hold int4).
RAGGED, DEFAULT, ROW, ODD, WIDE = (80, 45, (16, 32)), (300, 130, None), (33, 64, (8, 33)), (200, 40, (16, 96)), \
    (64, 300, (32, 64))
GROUPED = (96, 45, (16, 32))
CASES = [
    Case(*RAGGED, (1,), few=True),  # M = 1: the GEMV paths (XLA: 1-D reduce or loop dot; FFI/CUDA GEMVs)
    Case(*RAGGED, (4,), "bfloat16", few=True),
    Case(*RAGGED, (2, 3)),  # batch dims fold into M = 6
    Case(*DEFAULT, (3,)),
    Case(*DEFAULT, (1,), "bfloat16"),
    Case(*ROW, (16,), "bfloat16"),  # the CUDA MMA kernels' largest M
    Case(*WIDE, (20,)),  # M > 16: the XLA path's chunked dots (a full chunk and a tail)
    Case(*WIDE, (40,), "bfloat16", few=True),  # Pallas' tuned rows for 16 < M <= 64
    Case(*ODD, (2,)),
    Case(*RAGGED, (80,)),  # M > 64: past the handlers' rows for some codecs (_handler_rows); forced, they run it
    Case(*RAGGED, (3,), "float16", few=True),  # the CPU handlers refuse f16 x
    Case(*RAGGED, (3,), wdtype="bfloat16"),  # bf16 weights (raw / bitmask values, int8 of a bf16 tensor)
    Case(*GROUPED, (1,), few=True),
    Case(*GROUPED, (5,), "bfloat16"),
    Case(*GROUPED, (3,), wdtype="bfloat16"),
]
GRAD_CASES = [
    Case(*ROW, (1,)),
    Case(*RAGGED, (3,)),
    Case(*RAGGED, (2, 3), "bfloat16", few=True),
    Case(*DEFAULT, (20,)),  # M > 16; the XLA backward's 128-row chunk and its tail
    Case(*GROUPED, (3,), few=True),
]


# ------------------------------------------------------------------ what each implementation takes
def _cpu_info() -> dict:
    try:
        from ltjax.ffi import cpu
    except ImportError:
        return {}
    return cpu.info() if cpu.available() else {}


def declared_codecs(impl: str | None) -> tuple[str, ...]:
    """The codecs ``impl`` says it multiplies (its backend's own constant): it must run every one
    of them, and refuse the others with a reason."""
    if impl == "pallas":
        from ltjax import pallas
        return pallas.MATMUL_CODECS
    if impl == "ffi":
        from ltjax.ffi import cpu
        return cpu.MATMUL_CODECS
    if impl == "cuda":
        from ltjax.ffi import cuda
        return cuda.CODECS
    return CODECS  # xla, reference, the default dispatch: every codec


def refusals(impl: str | None, codec: str, case: Case) -> list[str]:
    """The reasons ``impl`` must give for refusing ``codec`` (`CompressedTensor.codec`) in ``case``
    (any of them): empty where it must run it."""
    why = []
    if codec not in declared_codecs(impl):
        why.append(f"(not|no Pallas kernel).*'{codec}'|'{codec}'.*(not|no Pallas kernel)")
    if impl == "ffi":  # (M > 64 is a preference of impl=None, not a refusal: forcing it runs it)
        if case.xdtype == "float16":
            why.append("the CPU handlers take float32/bfloat16 x")
    elif impl == "cuda":
        if case.m > 16:
            why.append("kernels take 1 to 16 rows of x")
        if codec == "int8" and case.k % 16:
            why.append(r"K % 16 == 0")
        if codec == "bitmask_int8" and case.tile is not None and not _cuda_tile_ok(case):
            why.append("tile columns of 32")
    return why


def _cuda_tile_ok(case: Case) -> bool:
    tc = case.tile[1]
    words = tc // 32
    return (tc % 32 == 0 and words <= 32 and words & (words - 1) == 0) or tc >= case.k


# A call every implementation takes: int8, K = 64, M = 2, f32 x.
_PROBE = (jax.ShapeDtypeStruct((2, 64), jnp.float32), make_ct("int8", 64, 32))


@functools.cache
def cannot_run_here(impl: str | None) -> str | None:
    """Why ``impl`` cannot run at all on this host (the registry's reason), None if it can."""
    if impl is None:
        return None
    try:
        ltjax.explain(*_PROBE, impl=impl)
    except ValueError as e:
        return str(e)
    return None


def require(impl: str | None, case: Case | None = None) -> None:
    why = cannot_run_here(impl)
    if why is not None:
        pytest.skip(why)
    if case is not None and impl in FEWER and not case.few:
        pytest.skip(f"impl={impl!r} runs the battery's few marked cases only here")


def weight(codec: str, case: Case, **kw):
    return make_ct(codec, case.k, case.n, tile=case.tile, dtype=jnp.dtype(case.wdtype), **kw)


def weights_and(cases) -> list:
    """(codec, case) for each of `WEIGHTS` and each case the codec can hold (int4: its scale groups)."""
    return [pytest.param(c, case, id=f"{c}-{case}") for c in WEIGHTS for case in cases
            if holds(c, (case.k, case.n), tile=case.tile)]


def _call(impl):
    return lambda x, ct: ltjax.matmul(x, ct, impl=impl)


def _expect_refusal(impl, ct, case, f, *args) -> bool:
    """When ``impl`` must refuse ``ct`` in ``case``: asserts it does, with one of its reasons (True)."""
    why = refusals(impl, ct.codec, case)
    if not why:
        return False
    with pytest.raises(ValueError, match=rf"impl='{impl}' cannot run matmul here: .*({'|'.join(why)})"):
        f(*args)
    return True


def _ids(v):
    return "auto" if v is None else str(v)


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("codec,case", weights_and(CASES))
@pytest.mark.parametrize("impl", IMPLS, ids=_ids)
def test_values(impl, codec, case):
    require(impl, case)
    ct = weight(codec, case)  # bf16 weights: the reference multiplies the f32 codes * scales, as every path does
    x = rand(case.batch + (case.k,), jnp.dtype(case.xdtype))
    f = jax.jit(_call(impl))
    if _expect_refusal(impl, ct, case, f, x, ct):
        return
    y = f(x, ct)
    assert y.shape == case.batch + (case.n,) and y.dtype == x.dtype
    assert_close(y, reference(x, ct))


# ------------------------------------------------------------------ gradients through the public VJP
def _grads(matmul, x, ct, c):
    """d/d(x, ct) of sum(y * c): one fixed cotangent for both sides, whatever y's rounding."""
    loss = lambda x, ct: jnp.sum(matmul(x, ct).astype(jnp.float32) * c)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(x, ct)


def assert_grads_match(got, want, ct):
    (gx, gct), (rx, rct) = got, want
    assert_close(gx, rx)
    for name, a in ct.leaves().items():
        if jnp.issubdtype(a.dtype, jnp.floating):  # scales; values of raw and bitmask
            assert_close(getattr(gct, name), getattr(rct, name))
        else:  # codes, mask, offsets, checksums: float0 zeros of the leaf's shape
            g = getattr(gct, name)
            assert g.dtype == jax.dtypes.float0 and g.shape == np.shape(a), (name, g.dtype, g.shape)


@pytest.mark.parametrize("codec,case", weights_and(GRAD_CASES))
@pytest.mark.parametrize("impl", IMPLS, ids=_ids)
def test_gradients(impl, codec, case):
    require(impl, case)
    ct = weight(codec, case)
    x = rand(case.batch + (case.k,), jnp.dtype(case.xdtype))
    c = rand(case.batch + (case.n,), seed=7)
    if _expect_refusal(impl, ct, case, _grads, _call(impl), x, ct, c):
        return
    assert_grads_match(_grads(_call(impl), x, ct, c), _grads(ltjax.matmul_reference, x, ct, c), ct)


# ------------------------------------------------------------------ jit and vmap
@pytest.mark.parametrize("codec", WEIGHTS)
@pytest.mark.parametrize("impl", IMPLS, ids=_ids)
def test_vmap(impl, codec):
    """vmap over x (folded into M), over x's gradient, and over a stack of weights (with x); each
    forced implementation (the default dispatch runs one of them, the reference's is jax's own)."""
    case = Case(*GROUPED, (2,), few=True)  # what each implementation sees: M = 2 per example
    if impl in (None, "reference"):
        pytest.skip("the default dispatch runs one of the forced implementations; the reference's vmap is jax's")
    require(impl, case)
    ct = weight(codec, case)
    x = rand((3, 2, case.k))
    c = rand((2, case.n), seed=8)
    if _expect_refusal(impl, ct, case, _call(impl), x[0], ct):
        return
    y = jax.jit(jax.vmap(lambda xi: ltjax.matmul(xi, ct, impl=impl)))(x)
    assert_close(y, reference(x, ct))

    def loss(matmul):
        return lambda xi: jnp.sum(matmul(xi, ct) * c)

    g = jax.jit(jax.vmap(jax.grad(loss(_call(impl)))))(x)
    assert_close(g, jax.jit(jax.vmap(jax.grad(loss(ltjax.matmul_reference))))(x))
    stack = weight(codec, case, stack=(3,))
    ys = jax.jit(jax.vmap(_call(impl)))(x, stack)
    assert_close(ys, jax.jit(jax.vmap(ltjax.matmul_reference))(x, stack))


def test_scale_cotangent_fits_finetuning():
    """Fine-tuning the scales moves the output towards a target (the gradient is usable)."""
    ct = make_ct("int8", 32, 16)
    x, target = rand((8, 32)), rand((8, 16), seed=5)

    def loss(s):
        return jnp.mean((ltjax.matmul(x, dataclasses.replace(ct, scales=s)) - target) ** 2)

    s, l0 = ct.scales, loss(ct.scales)
    for _ in range(5):
        s = s - 1e-7 * jax.grad(loss)(s)
    assert loss(s) < l0


# ------------------------------------------------------------------ dispatch
def _handler_rows(ct) -> float:
    """The rows of x up to which impl=None prefers the CPU handlers, as measured (docs/ffi.md,
    "Prefill crossover"): int8 at any M on AMX, int4 to 256, the others to 64."""
    if ct.codec == "int8" and ltjax.ffi.cpu.info()["amx"]:
        return float("inf")
    return 256 if ct.codec == "int4" else 64


def _first_runnable(x, ct) -> str:
    """What the registry order says ``impl=None`` runs on this host for (x, ct)."""
    for impl in IMPLEMENTATIONS:
        if impl.name == "cuda" and not ltjax._config.settings().cuda_gemv:
            continue  # opt-in
        if impl.name == "ffi" and x.shape[0] > _handler_rows(ct):
            continue  # above these rows the XLA path's dots win (docs/ffi.md, "Prefill crossover")
        if cannot_run_here(impl.name) is None and not refusals(impl.name, ct.codec, Case(ct.shape[0], ct.shape[1],
                                                                                         ct.tile, (x.shape[0],))):
            if impl.platforms is None or ltjax._config.host_platform() in impl.platforms:
                return impl.name
    raise AssertionError("the reference runs anywhere")


@pytest.mark.parametrize("m", [1, 80, 200, 300])
@pytest.mark.parametrize("codec", WEIGHTS)
def test_explain_here(codec, m):
    ct = make_ct(codec, *GROUPED[:2], tile=GROUPED[2])
    x = jax.ShapeDtypeStruct((m, GROUPED[0]), jnp.float32)
    e = ltjax.explain(x, ct)
    assert e.op == "matmul" and e.platform == ltjax._config.host_platform() and not e.interpret
    assert list(e.reasons) == [i.name for i in IMPLEMENTATIONS]
    assert e.impl == _first_runnable(x, ct) and e.reasons[e.impl] is None
    assert e.platforms[e.platform] == e.impl
    for name, why in e.reasons.items():  # every other one: a reason, or lower in the order
        assert why is None or (isinstance(why, str) and why), (name, why)
    if ltjax._config.host_platform() == "cpu":
        assert "opt-in" in e.reasons["cuda"] and "runs on cuda/rocm" in e.reasons["pallas"]
        # dx: the forward's own transposed kernel where it has one and takes M, else the next that does
        want_dx = e.impl if e.impl in {t.name for t in TRANSPOSES} and not (e.impl == "ffi" and m > 64) else "xla"
        assert e.backward == f"dx: {want_dx}"
    assert str(e).startswith(f"matmul x[{m}, {GROUPED[0]}] float32 @ ") and e.to_json()["impl"] == e.impl


@pytest.mark.parametrize("codec", WEIGHTS)
def test_explain_for_cuda_picks_pallas(codec):
    """Lowered for CUDA: the Pallas kernels for every codec they have, else the XLA path."""
    ct = make_ct(codec, *GROUPED[:2], tile=GROUPED[2])
    e = ltjax.explain(jax.ShapeDtypeStruct((1, GROUPED[0]), jnp.float32), ct, platform="cuda")
    want = "xla" if refusals("pallas", ct.codec, Case(*GROUPED, (1,))) else "pallas"
    assert (e.platform, e.impl, e.interpret, e.backward) == ("cuda", want, False, f"dx: {want}")
    assert e.reasons["ffi"] == "runs on cpu; the platform is 'cuda'"
    assert e.platforms["cuda"] == e.platforms["rocm"] == want


def test_default_path_above_64_rows():
    """M = 80 on the default dispatch: the CPU handlers' int8 AMX GEMM where the CPU has it (its dx
    above 64 rows on the XLA path), else the XLA path; values and gradients match either way."""
    case = Case(*RAGGED, (80,))
    ct = make_ct("int8", case.k, case.n, tile=case.tile)
    x, c = rand((80, case.k)), rand((80, case.n), seed=9)
    e = ltjax.explain(x, ct)
    if ltjax._config.host_platform() == "cpu":
        assert e.impl == ("ffi" if _cpu_info().get("amx") else "xla") and e.backward == "dx: xla"
    assert_close(jax.jit(ltjax.matmul)(x, ct), reference(x, ct))
    assert_grads_match(_grads(ltjax.matmul, x, ct, c), _grads(ltjax.matmul_reference, x, ct, c), ct)


def test_forced_interpret_mode_is_explained():
    """Forcing an implementation off its platforms runs its emulation, and explain says so."""
    if ltjax._config.host_platform() in ("cuda", "rocm"):
        pytest.skip("on a GPU the Pallas kernels run natively")
    e = ltjax.explain(*_PROBE, impl="pallas")
    assert e.impl == "pallas" and e.interpret and "(emulated)" in str(e) and e.backward == "dx: pallas (emulated)"
    assert set(e.platforms.values()) == {"pallas"}  # forced: the same choice on every platform


def test_fallback_is_logged_once(caplog, monkeypatch):
    """A weight stored [K, N] (axis=0) only the reference multiplies: the fallback is logged once,
    on the "ltjax" logger, naming the axis; forcing the XLA path raises with the same reason."""
    monkeypatch.setattr(ltjax._config, "_LOGGED", set())  # this process may have logged it already
    ct = make_ct("int8", 64, 32, axis=0)
    x = rand((2, 64))
    with caplog.at_level(logging.INFO, logger="ltjax"):
        y1 = ltjax.matmul(x, ct)
        y2 = ltjax.matmul(x, ct)
    assert ltjax.explain(x, ct).impl == "reference"
    assert_close(y1, ltjax.matmul_reference(x, ct))
    np.testing.assert_array_equal(y1, y2)
    msgs = [r.getMessage() for r in caplog.records if r.name == "ltjax" and "falls back from xla" in r.getMessage()]
    assert len(msgs) == 1 and "axis=0" in msgs[0], msgs
    with pytest.raises(ValueError, match="impl='xla' cannot run matmul here: .*axis=0"):
        ltjax.matmul(x, ct, impl="xla")


@pytest.mark.parametrize("impl,module,attr,what", [("pallas", "matmul.pallas", "_pallas", "ltjax.pallas"),
                                                   ("ffi", "_cpu", "handlers", "ltjax.ffi.cpu"),
                                                   ("cuda", "matmul.cuda", "_cuda", "ltjax.ffi.cuda")])
def test_forced_missing_backend_raises(monkeypatch, impl, module, attr, what):
    """An installation without a backend's Python side: forcing it names what is missing, and the
    default dispatch goes on without it."""
    import importlib

    monkeypatch.setattr(importlib.import_module(f"ltjax.ops.{module}"), attr, None)
    ct, x = make_ct("int8", 64, 32), rand((1, 64))
    with pytest.raises(ValueError, match=f"impl='{impl}' cannot run matmul here: {what} is not available"):
        ltjax.matmul(x, ct, impl=impl)
    if impl == "ffi" and ltjax._config.host_platform() == "cpu":  # the others answer their platform (opt-in) first
        assert ltjax.explain(x, ct).reasons[impl] == f"{what} is not available in this installation"
    assert_close(ltjax.matmul(x, ct), ltjax.matmul_reference(x, ct))


def test_unknown_impl_raises():
    ct = make_ct("int8", 64, 32)
    with pytest.raises(ValueError, match=r"impl='bogus' is not an implementation of matmul; choose one of "
                                         r"\('cuda', 'pallas', 'ffi', 'xla', 'reference'\) or None"):
        ltjax.matmul(rand((1, 64)), ct, impl="bogus")
    with pytest.raises(ValueError, match="impl='bogus' is not an implementation of matmul"):
        ltjax.explain(rand((1, 64)), ct, impl="bogus")


def test_bad_input():
    ct = make_ct("int8", 64, 32)
    with pytest.raises(ValueError, match=r"x.shape=\(4, 63\).*ct.shape=\(64, 32\)"):
        ltjax.matmul(jnp.ones((4, 63)), ct)
    with pytest.raises(ValueError, match=r"x.dtype=int32.*\(4, 64\)"):
        ltjax.matmul(jnp.ones((4, 64), jnp.int32), ct)
    ct3 = ltjax.compress(np.ones((4, 8, 16), np.float32), "int8")
    with pytest.raises(ValueError, match=r"2-D.*ct.shape=\(4, 8, 16\)"):
        ltjax.matmul(jnp.ones((2, 4)), ct3)
    with pytest.raises(ValueError, match=r"x.shape=\(\)"):
        ltjax.matmul(jnp.float32(1.0), ct)
    with pytest.raises(ValueError, match="CompressedTensor"):
        ltjax.matmul(jnp.ones((4, 64)), jnp.ones((64, 32)))
    with pytest.raises(ValueError, match=r"x.shape=\(4, 63\)"):
        ltjax.explain(jax.ShapeDtypeStruct((4, 63), jnp.float32), ct)
