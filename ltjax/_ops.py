"""The public op layer: `decompress` and `matmul` on `CompressedTensor`s, their VJPs and dispatch.

Dispatch (one place: `_choose_impl`, once per lowering platform: `_plan`)
------------------------------------------------------------------------
A program holds one choice per platform (CPU, CUDA, ROCm, other; `ltjax._platform`) and the
compiler keeps the branch of the platform it compiles for. On each, ``impl=None`` picks, in order: ``"cuda"`` on GPU when ``LTJAX_CUDA_GEMV=1`` and
`ltjax.ffi.gemv.why_not` says yes (the CUDA small-M kernels, docs/cuda.md: opt-in until a GPU
has timed them); ``"pallas"`` on GPU when `ltjax.pallas.can_use_pallas` says yes;
``"ffi"`` on CPU when `ltjax.ffi.can_use_ffi` says yes (single device: a custom call is not SPMD-partitioned; M <= 64: above it the XLA path is faster, except for int8 on AMX CPUs); ``"xla"`` when `can_use_xla` says yes
(2-D tensors in the output-channel-major storage of a Dense kernel, any codec, any backend);
``"reference"`` otherwise. Each fallback is logged once per reason on the ``"ltjax"`` logger.
A user can force any of them; a forced impl that cannot run raises `ValueError` with the
reason (``"pallas"`` forced on a non-GPU backend runs the kernels with ``interpret=True``,
``"cuda"`` the CUDA kernels' CPU emulation).

The XLA path (measured, jax 0.10.2 CPU, 2 shared cores, K = N = 4096, int8 codes, ms)
--------------------------------------------------------------------------------------
Forward ``y[m, n] = s[n] * sum_k x[m, k] codes[n, k]`` over the [N, K] storage:

====  ===========  ==========================  ======================  ========================
M     f32 dense    1-D fused multiply-reduce   3-D ``[M, N, K]`` reduce  dot over 256-row chunks
====  ===========  ==========================  ======================  ========================
1     2.2          **1.5**                     155 (the [1, K] cliff)  2.8
4     3.8–4.1      21.8 (M unrolled 1-D rows)  **1.6–3.2**             6.2–10.5
16    8.4–18.7     71.6 (M unrolled 1-D rows)  **3.1**                 7.7–14.7
64    11.4–24      —                           25.6                    **11.2–12.9**
====  ===========  ==========================  ======================  ========================

Below about 4M weights (measured at 1024² and 2048², not at 4096²) XLA CPU instead emits
``x1d @ f32(codes).T`` as a single loop fusion split over both cores, with no temp: 0.16 ms
vs 0.26 (1-D reduce) and 0.28 (f32 dense) at 1024², 0.38 vs 0.95 and 0.78 at 2048²; at
4096² the same expression materialises an f32 copy (64 MiB temp, 125 ms). So M = 1 uses
that form for ``int8``/``raw`` up to `_LOOP_DOT_MAX_ELEMENTS`, the 1-D reduce above it.

Converting all codes to f32 and calling one dot ran 17–45 ms at every M (it materialises an
f32 copy of W); a bf16 copy ran 11–20 ms. So: M = 1 → the 1-D form, 2 ≤ M ≤ `_VMAP_MAX_M`
→ the 3-D fused reduce, larger M → a loop over row chunks, each decoded to f32 (a few MiB,
cache resident) and fed to a dot. Ranges are the spread across runs on the shared cores.

Backward ``dx[m, k] = sum_n (dy[m, n] s[n]) codes[n, k]`` reduces over the *leading* axis of
the storage: written as a column reduce it ran 1455 ms at M = 1 (800–2170 ms as a 3-D middle
axis reduce), one dot over an f32 copy 46–79 ms, the dense ``dy @ W.T`` 19–58 ms, and a scan over
128-row chunks accumulating ``dy[:, chunk] @ f32(codes[chunk])`` **4.9–26 ms** (M = 1…64):
that is what the XLA backward uses at every M.

Bitmask codecs on the XLA path decode in place: per element, the bit, ``popcount`` of the
lower bits of its mask word plus a per-word base (`_word_base`, a prefix over 1/32 of the
elements) give the packed index, and a gather reads the value; the same three forms by M
follow. Honest figures (benchmarks/results/matmul_cpu.json, 4096², loaded cores):
``bitmask_int8`` 50% at M = 1 runs 84 ms vs f32 dense 4.4 ms and the naive decode-then-dot
273 ms; at M = 64, 24 ms vs 38 ms f32. The elementwise bit/index arithmetic alone (no gather)
costs ~84 ms at 4096² on XLA CPU: XLA cannot make sparse weights pay on CPU; the FFI
handlers are meant to.

No dense weight around the op: every decode sits inside the reduction or inside a loop body
indexed by the loop counter, so XLA has no parameter-only dense array to hoist to the
program start (`tests/test_memory.py` checks the compiled temp memory).

Gradients
---------
`matmul` and `decompress` are `jax.custom_vjp`s. Residuals are the compressed tensor and
``x`` (plus, on the XLA path, the unscaled ``[M, N]`` accumulator that the scale gradient
needs), never a dense weight. Float leaves get cotangents: ``scales`` (``ds[n] = sum_m dy[m, n]
acc[m, n]`` with ``acc = x @ codes^T``, the forward before scaling), ``values`` of
``bitmask`` (``dv[p] = sum_m dy[m, n_p] x[m, k_p]`` at each packed position ``p``) and of
``raw``; integer leaves (codes, mask, offsets, checksums) get ``float0`` zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ltjax._format import CompressedTensor, Header, decompress_reference, from_storage
from ltjax._platform import PLATFORMS, per_platform

try:  # Pallas GPU kernels (may be absent or partial in this checkout).
    from ltjax import pallas as _pallas
except ImportError:  # pragma: no cover - depends on the installation
    _pallas = None
try:  # CPU FFI handlers (may be absent or partial in this checkout).
    from ltjax import ffi as _ffi
except ImportError:  # pragma: no cover
    _ffi = None
try:  # the CUDA small-M kernels (their CPU twins are an emulation for tests).
    from ltjax.ffi import gemv as _gemv
except ImportError:  # pragma: no cover
    _gemv = None

IMPLS = ("pallas", "cuda", "ffi", "xla", "reference")
DECOMPRESS_IMPLS = ("pallas", "ffi", "xla", "reference")  # the CUDA kernels only multiply
_LOOP_DOT_MAX_ELEMENTS = 2048 * 2048  # M = 1: up to here XLA fuses convert+dot into one loop
_VMAP_MAX_M = 16  # largest M for the 3-D fused multiply-reduce; beyond it, chunked dots
_FWD_CHUNK_ROWS = 256  # rows of W^T decoded per step of the chunked forward (4 MiB f32 at K=4096)
_BWD_CHUNK_ROWS = 128  # rows of W^T decoded per step of the backward dx scan

logger = logging.getLogger("ltjax")
_logged_reasons: set[str] = set()


def _log_fallback_once(reason: str) -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.info("ltjax: %s", reason)


@dataclasses.dataclass(frozen=True, slots=True)
class _Config:
    """The static (non-differentiable) configuration of one op call on one platform: hashable."""

    impl: str
    interpret: bool = False


# The lowering platforms each op chooses an implementation for. A jitted program holds one
# choice per platform (`ltjax._platform.per_platform`): the compiler only ever sees the branch
# of the platform it compiles for, so a program traced on a CPU host and exported (`jax.export`,
# ``lower(lowering_platforms=("cuda",))`` or ``("cpu", "cuda")``) runs the GPU kernels on a GPU.


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """One `_Config` per lowering platform (`PLATFORMS`, then ``default`` for any other)."""

    cpu: _Config
    cuda: _Config
    rocm: _Config
    default: _Config

    @classmethod
    def everywhere(cls, cfg: _Config) -> "_Plan":
        return cls(cfg, cfg, cfg, cfg)

    @property
    def single(self) -> _Config | None:
        """The config when every platform has the same one (no platform switch needed)."""
        return self.cpu if self.cpu == self.cuda == self.rocm == self.default else None

    def config(self, platform: str) -> _Config:
        return getattr(self, platform) if platform in PLATFORMS else self.default


def _per_platform(plan: _Plan, fn, *args):
    """``fn(config, *args)`` with the config of the platform the program is lowered for."""
    if plan.single is not None:
        return fn(plan.single, *args)
    calls = {cfg: functools.partial(fn, cfg) for cfg in (plan.cpu, plan.cuda, plan.rocm, plan.default)}
    return per_platform({p: calls[plan.config(p)] for p in PLATFORMS}, calls[plan.default], *args)


# ============================================================================ predicates
def _backend() -> str:
    return jax.default_backend()


def _is_gpu() -> bool:
    return _backend() in ("gpu", "cuda", "rocm")


def host_platform() -> str:
    """This host's default platform as a lowering platform name: ``"cpu"``, ``"cuda"``, ``"rocm"``, ..."""
    backend = _backend()
    if backend != "gpu":
        return backend
    version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"


def _module_has(mod: Any, *names: str) -> bool:
    return mod is not None and all(callable(getattr(mod, n, None)) for n in names)


def _explicit_sharding(*arrays: Any) -> str | None:
    """The sharding of the first operand sharded along an explicit mesh axis (None: none is)."""
    for a in jax.tree.leaves(arrays):
        try:
            spec = jax.typeof(a).sharding.spec
        except (AttributeError, TypeError):
            continue
        if any(s is not None for s in spec):
            return str(jax.typeof(a))
    return None


def _pallas_reason(x2: Any, ct: CompressedTensor, *, need_gpu: bool = True, platform: str | None = None) -> str | None:
    """Why the Pallas kernels cannot run this matmul on ``platform`` (default: this host's; None: they can).
    ``need_gpu=False``: in interpret mode, anywhere."""
    if not _module_has(_pallas, "can_use_pallas", "why_not_pallas", "matmul", "matmul_t"):
        return "ltjax.pallas kernels are not available in this installation"
    sharded = _explicit_sharding(x2, ct)
    if sharded is not None:
        return f"the Pallas kernels take unsharded operands; {sharded} is sharded along an explicit mesh axis"
    platform = platform or host_platform()
    if need_gpu and platform not in ("cuda", "rocm"):
        return f"Pallas kernels need a GPU; the platform is {platform!r}"
    interpret = not need_gpu
    dy2 = jax.ShapeDtypeStruct((x2.shape[0], ct.shape[1]), x2.dtype)
    for a, transpose in ((x2, False), (dy2, True)):  # the forward kernel and the backward's (dx)
        why = _pallas.why_not_pallas(a, ct, transpose=transpose, interpret=interpret, platform=platform)
        if why is not None:
            return f"ltjax.pallas cannot run x{tuple(x2.shape)} {x2.dtype} @ {ct!r}: {why}"
    return None


# Above this many rows the FFI GEMM loses to the XLA path (row chunks decoded to f32 fed to
# XLA's dot), measured at K = N = 1024 / 4096 on 2 cores (ms, ffi / xla / dense f32):
# M=64 0.94/1.99/1.37 and 22.6/27.1/13.7; M=256 3.96/3.21/2.23 and 171/79/81;
# M=1024 21.5/10.5/8.5 and 625/287/284.
# Except the int8 GEMM on AMX tiles (`ltjax.ffi.info()["amx"]`), which wins at every M: at 4096²
# (ms, ffi / xla / dense f32) M=128 5.3/18.8/16.9, M=256 10.9/31.0/29.2, M=1024 48/113/108
# (docs/ffi.md "AMX int8 GEMM"). The backward's dx stays on the FFI only up to this M.
_FFI_MAX_M = 64


def _ffi_amx_gemm(ct: CompressedTensor) -> bool:
    return ct.codec == "int8" and _module_has(_ffi, "info") and bool(_ffi.info().get("amx"))


def _ffi_reason(x2: Any, ct: CompressedTensor, platform: str | None = None) -> str | None:
    """Why the CPU FFI handlers cannot run this matmul when lowered for ``platform`` (default: this host's)."""
    if not _module_has(_ffi, "can_use_ffi", "matmul", "matmul_t"):
        return "ltjax.ffi handlers are not available in this installation"
    platform = platform or host_platform()
    if platform != "cpu":
        return f"FFI handlers run on CPU; the platform is {platform!r}"
    if _backend() != "cpu":  # the handlers' extension and ISA (AVX-512, AMX) are this host's
        return f"the CPU handlers are chosen where the program is traced on a CPU host; this one is {_backend()!r}"
    sharded = _explicit_sharding(x2, ct)
    if sharded is not None:  # a custom call's result carries no sharding; the XLA path's does
        return f"the CPU handlers take unsharded operands; {sharded} is sharded along an explicit mesh axis"
    if x2.shape[0] > _FFI_MAX_M and not _ffi_amx_gemm(ct):
        return f"M={x2.shape[0]} > {_FFI_MAX_M}: the XLA path's chunked dots are faster there"
    if jax.device_count() > 1:
        # A custom call is opaque to SPMD partitioning: sharded operands would be all-gathered
        # around it. The XLA path partitions like any other XLA op and keeps shards local.
        return f"FFI custom calls are not partitioned across the {jax.device_count()} devices"
    if not _ffi.can_use_ffi(x2, ct):
        return f"ltjax.ffi.can_use_ffi said no for x{tuple(x2.shape)} {x2.dtype} and {ct!r}"
    return None


def _cuda_reason(x2: Any, ct: CompressedTensor, *, need_gpu: bool = True, platform: str | None = None) -> str | None:
    """Why the CUDA kernels cannot run this matmul (None: they can); its backward's dx runs on Pallas.
    ``need_gpu=False``: their CPU emulation (forced ``impl="cuda"`` off-GPU)."""
    if not _module_has(_gemv, "why_not", "gemv"):
        return "ltjax.ffi.gemv is not available in this installation"
    if need_gpu and (platform or host_platform()) != host_platform():  # their targets register with this host's runtime
        return f"the CUDA kernels are chosen on a CUDA host only; this host is {host_platform()!r}"
    why = _gemv.why_not(x2, ct, emulate=not need_gpu)
    if why is not None:
        return why
    if need_gpu:
        return _pallas_reason(x2, ct, platform=platform)
    return None


def _xla_reason(ct: CompressedTensor) -> str | None:
    if ct.ndim != 2 or ct.header.axis != 1:
        return (
            f"the XLA path needs a 2-D tensor stored output-channel-major (axis=1, storage [N, K]); "
            f"got shape={ct.shape} axis={ct.header.axis}"
        )
    return None


def can_use_pallas(x: Any, ct: CompressedTensor) -> bool:
    """Whether `matmul(x, ct)` can run on the Pallas GPU kernels here."""
    return _pallas_reason(jnp.reshape(x, (-1, x.shape[-1])) if x.ndim != 2 else x, ct) is None


def can_use_ffi(x: Any, ct: CompressedTensor) -> bool:
    """Whether `matmul(x, ct)` can run on the CPU FFI handlers here."""
    return _ffi_reason(jnp.reshape(x, (-1, x.shape[-1])) if x.ndim != 2 else x, ct) is None


def can_use_xla(x: Any, ct: CompressedTensor) -> bool:
    """Whether `matmul(x, ct)` can take the fused XLA path (any backend)."""
    del x
    return _xla_reason(ct) is None


def _forced(x2: Any, ct: CompressedTensor, impl: str) -> _Config:
    """A forced ``impl``: that implementation (on this host), or ``ValueError`` with the reason it cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"{impl=} is not an implementation; choose one of {IMPLS} or None")
    if impl == "pallas":
        reason = _pallas_reason(x2, ct, need_gpu=False)
        cfg = _Config("pallas", interpret=not _is_gpu())
    elif impl == "cuda":
        reason = _cuda_reason(x2, ct, need_gpu=False)
        cfg = _Config("cuda", interpret=not _is_gpu())
    elif impl == "ffi":
        reason, cfg = _ffi_reason(x2, ct), _Config("ffi")
    elif impl == "xla":
        reason, cfg = _xla_reason(ct), _Config("xla")
    else:
        reason, cfg = None, _Config("reference")
    if reason is not None:
        raise ValueError(f"impl={impl!r} cannot run: {reason}")
    return cfg


def _choose_impl(x2: Any, ct: CompressedTensor, impl: str | None, platform: str | None = None) -> _Config:
    """The single dispatch point for `matmul`: the best implementation that can run on ``platform``
    (default: this host's), or the forced ``impl``. Fallbacks on this host's platform are logged once."""
    if impl is not None:
        return _forced(x2, ct, impl)
    platform = platform or host_platform()
    log = _log_fallback_once if platform == host_platform() else (lambda reason: None)
    if platform == "cuda" and _module_has(_gemv, "enabled") and _gemv.enabled():
        reason = _cuda_reason(x2, ct, platform=platform)
        if reason is None:
            return _Config("cuda")
        log(f"matmul falls back from the CUDA kernels: {reason}")
    if platform in ("cuda", "rocm"):
        reason = _pallas_reason(x2, ct, platform=platform)
        if reason is None:
            return _Config("pallas")
        log(f"matmul falls back from Pallas: {reason}")
    elif platform == "cpu":
        reason = _ffi_reason(x2, ct, platform)
        if reason is None:
            return _Config("ffi")
        log(f"matmul falls back from FFI: {reason}")
    reason = _xla_reason(ct)
    if reason is None:
        return _Config("xla")
    log(f"matmul falls back to the jnp reference: {reason}")
    return _Config("reference")


def _plan(x2: Any, ct: CompressedTensor, impl: str | None) -> _Plan:
    """`_choose_impl` for every lowering platform (a forced ``impl``: the same everywhere)."""
    if impl is not None:
        return _Plan.everywhere(_forced(x2, ct, impl))
    cfgs = [_choose_impl(x2, ct, None, p) for p in PLATFORMS]
    return _Plan(*cfgs, default=_Config("xla" if _xla_reason(ct) is None else "reference"))


# ============================================================================ XLA decode pieces
def _word_base(h: Header, mask: jax.Array, offsets: jax.Array) -> jax.Array:
    """int32 [C, W]: the packed index of the first nonzero at or after each mask word.

    An exclusive prefix of per-word popcounts in packed (tile-major, row-major in tile) order,
    plus the tile's stored offset; 1/32 of the elements, so cheap to materialise.
    """
    (c, _), (tr, tc) = h.storage_shape, h.tile
    gr, gc = h.tile_grid
    w, wpt = h.mask_words, -(-tc // 32)
    pc = lax.population_count(mask).astype(jnp.int32)
    p = jnp.pad(pc, ((0, gr * tr - c), (0, gc * wpt - w)))
    p = p.reshape(gr, tr, gc, wpt).transpose(0, 2, 1, 3).reshape(gr, gc, tr * wpt)
    base = jnp.cumsum(p, axis=-1) - p + offsets.astype(jnp.int32).reshape(gr, gc, 1)
    return base.reshape(gr, gc, tr, wpt).transpose(0, 2, 1, 3).reshape(gr * tr, gc * wpt)[:c, :w]


def _bits_and_index(mask_rows: jax.Array, base_rows: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """Per element of some rows: (is-nonzero bool [n, r], packed index int32 [n, r]). Elementwise."""
    n, w = mask_rows.shape
    sh = jnp.arange(32, dtype=jnp.uint32)
    words = mask_rows[:, :, None]
    bits = ((words >> sh) & jnp.uint32(1)).astype(bool)
    below = lax.population_count(words & ((jnp.uint32(1) << sh) - jnp.uint32(1))).astype(jnp.int32)
    idx = base_rows[:, :, None] + below
    return bits.reshape(n, w * 32)[:, :r], idx.reshape(n, w * 32)[:, :r]


def _decode_rows(ct: CompressedTensor, base: jax.Array | None, start: Any, size: int) -> jax.Array:
    """Rows ``[start, start+size)`` of the storage matrix *before* scaling, as f32 (fusable).

    ``start`` may be traced (a loop counter); ``base`` is `_word_base` for the bitmask codecs.
    """
    h = ct.header
    r = h.storage_shape[1]
    if h.codec in ("raw", "int8"):
        a = ct.values if h.codec == "raw" else ct.codes
        return lax.dynamic_slice_in_dim(a, start, size, 0).astype(jnp.float32)
    packed = ct.values if h.codec == "bitmask" else ct.codes
    if packed.shape[0] == 0:
        return jnp.zeros((size, r), jnp.float32)
    bits, idx = _bits_and_index(
        lax.dynamic_slice_in_dim(ct.mask, start, size, 0), lax.dynamic_slice_in_dim(base, start, size, 0), r
    )
    vals = jnp.take(packed, jnp.clip(idx, 0, packed.shape[0] - 1), axis=0, mode="clip")
    return jnp.where(bits, vals.astype(jnp.float32), 0.0)


def _base_of(ct: CompressedTensor) -> jax.Array | None:
    if ct.codec in ("bitmask", "bitmask_int8"):
        return _word_base(ct.header, ct.mask, ct.offsets)
    return None


def _has_scales(ct: CompressedTensor) -> bool:
    return ct.codec in ("int8", "bitmask_int8")


def _chunks(n: int, rows: int) -> tuple[int, int, int]:
    """(number of full chunks, chunk rows, remainder rows) for n rows."""
    rows = max(1, min(rows, n))
    return n // rows, rows, n % rows


# The XLA path's contractions are f32 by contract: on GPU a plain f32 dot runs in TF32 (about
# 1e-3 relative), ten times the error budget the codecs are measured against.
_F32 = lax.Precision.HIGHEST


def _xla_acc(x2: jax.Array, ct: CompressedTensor) -> jax.Array:
    """f32 ``[M, N]``: ``x2 @ W^T`` over the unscaled storage rows (the shape-dependent forms)."""
    (n, k), m = ct.header.storage_shape, x2.shape[0]
    xf = x2.astype(jnp.float32)
    base = _base_of(ct)
    if m == 1:  # x as 1-D: a [1, K] broadcast is the 100x cliff
        w = _decode_rows(ct, base, 0, n)
        if n * k <= _LOOP_DOT_MAX_ELEMENTS and ct.codec in ("raw", "int8"):
            return jnp.matmul(xf[0], w.T, precision=_F32)[None, :]  # one 2-thread loop fusion, no temp
        return jnp.sum(w * xf[0][None, :], axis=-1)[None, :]
    if m <= _VMAP_MAX_M:
        return jnp.sum(_decode_rows(ct, base, 0, n)[None, :, :] * xf[:, None, :], axis=-1)
    nb, rows, rem = _chunks(n, _FWD_CHUNK_ROWS)
    dims = (((1,), (1,)), ((), ()))

    def step(i):
        w = _decode_rows(ct, base, i * rows, rows)  # (rows, K)
        return lax.dot_general(xf, w, dims, precision=_F32, preferred_element_type=jnp.float32)  # (M, rows)

    out = lax.map(step, jnp.arange(nb, dtype=jnp.int32))  # (nb, M, rows)
    out = jnp.transpose(out, (1, 0, 2)).reshape(m, nb * rows)
    if rem:
        tail = lax.dot_general(xf, _decode_rows(ct, base, nb * rows, rem), dims, precision=_F32,
                               preferred_element_type=jnp.float32)
        out = jnp.concatenate([out, tail], axis=1)
    return out


def _xla_matmul_t(dy2: jax.Array, ct: CompressedTensor) -> jax.Array:
    """f32 ``[M, K]``: ``dy2 @ W^T`` for logical ``W [K, N]`` (so ``dy2 @ storage``), chunked over N."""
    (n, k), m = ct.header.storage_shape, dy2.shape[0]
    g = dy2.astype(jnp.float32)
    if _has_scales(ct):
        g = g * ct.scales[None, :]
    base = _base_of(ct)
    nb, rows, rem = _chunks(n, _BWD_CHUNK_ROWS)

    def step(acc, i):
        w = _decode_rows(ct, base, i * rows, rows)  # (rows, K)
        gi = lax.dynamic_slice_in_dim(g, i * rows, rows, 1)  # (M, rows)
        return acc + jnp.dot(gi, w, precision=_F32, preferred_element_type=jnp.float32), None

    acc = jnp.zeros((m, k), jnp.float32)
    if nb:
        acc, _ = lax.scan(step, acc, jnp.arange(nb, dtype=jnp.int32))
    if rem:
        acc = acc + jnp.dot(g[:, nb * rows :], _decode_rows(ct, base, nb * rows, rem), precision=_F32,
                            preferred_element_type=jnp.float32)
    return acc


def _xla_decompress(ct: CompressedTensor) -> jax.Array:
    h = ct.header
    st = _decode_rows(ct, _base_of(ct), 0, h.storage_shape[0])
    if _has_scales(ct):
        st = st * ct.scales[:, None]
    return from_storage(st.astype(ct.dtype), h)


def packed_positions(ct: CompressedTensor) -> tuple[jax.Array, jax.Array]:
    """(row, col) int32 ``[nnz]`` storage position of each packed value of a bitmask codec."""
    h = ct.header
    c, r = h.storage_shape
    nnz = (ct.values if h.codec == "bitmask" else ct.codes).shape[0]
    bits, idx = _bits_and_index(ct.mask, _word_base(h, ct.mask, ct.offsets), r)
    target = jnp.where(bits, idx, nnz).reshape(-1)  # out of range → dropped
    flat = jnp.zeros((nnz,), jnp.int32).at[target].set(jnp.arange(c * r, dtype=jnp.int32), mode="drop")
    return flat // max(r, 1), flat % max(r, 1)


# ============================================================================ cotangents for ct
def _float0_like(a: Any) -> np.ndarray:
    return np.zeros(np.shape(a), dtype=jax.dtypes.float0)


def _ct_cotangent(ct: CompressedTensor, **float_cots: Any) -> CompressedTensor:
    """A CompressedTensor-shaped cotangent: given float leaves, float0 zeros for integer leaves."""
    leaves = {}
    for f, a in ct.leaves().items():
        if f in float_cots:
            leaves[f] = float_cots[f]
        elif jnp.issubdtype(a.dtype, jnp.floating):
            leaves[f] = jnp.zeros(a.shape, a.dtype)
        else:
            leaves[f] = _float0_like(a)
    return dataclasses.replace(ct, **leaves)


# ============================================================================ matmul
def _forward(cfg: _Config, x2: jax.Array, ct: CompressedTensor) -> tuple[jax.Array, jax.Array | None]:
    """(y [M, N] in x's dtype, the f32 unscaled accumulator when the impl has it for free)."""
    if cfg.impl == "pallas":
        return _pallas.matmul(x2, ct, interpret=cfg.interpret).astype(x2.dtype), None
    if cfg.impl == "cuda":  # interpret: the CPU emulation of the same decode
        return _gemv.gemv(x2, ct), None
    if cfg.impl == "ffi":
        return _ffi.matmul(x2, ct).astype(x2.dtype), None
    if cfg.impl == "xla":
        acc = _xla_acc(x2, ct)
        y = acc * ct.scales[None, :] if _has_scales(ct) else acc
        return y.astype(x2.dtype), acc
    return matmul_reference(x2, ct), None


def _matmul_t(cfg: _Config, dy2: jax.Array, ct: CompressedTensor) -> jax.Array:
    if cfg.impl == "pallas" or (cfg.impl == "cuda" and not cfg.interpret):  # the GEMV has no transposed twin
        return _pallas.matmul_t(dy2, ct, interpret=cfg.interpret)
    if cfg.impl == "ffi" and dy2.shape[0] <= _FFI_MAX_M:  # larger M: only the AMX forward is faster
        return _ffi.matmul_t(dy2, ct)
    return _xla_matmul_t(dy2, ct)


def _forward_y(cfg: _Config, x2: jax.Array, ct: CompressedTensor) -> jax.Array:
    return _forward(cfg, x2, ct)[0]


def _forward_acc(cfg: _Config, x2: jax.Array, ct: CompressedTensor) -> tuple[jax.Array, jax.Array]:
    """`_forward` with an accumulator on every platform: the XLA path's, or zeros the others never read."""
    y, acc = _forward(cfg, x2, ct)
    return y, (jnp.zeros((x2.shape[0], ct.shape[1]), jnp.float32) if acc is None else acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul2(plan: _Plan, x2: jax.Array, ct: CompressedTensor) -> jax.Array:
    return _per_platform(plan, _forward_y, x2, ct)


def _matmul2_fwd(plan, x2, ct):
    if plan.single is not None:
        y, acc = _forward(plan.single, x2, ct)
    else:
        y, acc = _per_platform(plan, _forward_acc, x2, ct)
    return y, (x2, ct, acc)


def _backward(cfg: _Config, x2, ct: CompressedTensor, acc, dy) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(dx, the cotangents of ``ct``'s float leaves) on one implementation."""
    floats = {f: a for f, a in ct.leaves().items() if jnp.issubdtype(a.dtype, jnp.floating)}
    if cfg.impl == "reference":
        dx, bar = jax.vjp(matmul_reference, x2, ct)[1](dy)
        return dx, {f: getattr(bar, f) for f in floats}
    dx = _matmul_t(cfg, dy, ct).astype(x2.dtype)
    dyf, xf = dy.astype(jnp.float32), x2.astype(jnp.float32)
    cots: dict[str, Any] = {}
    if ct.codec == "raw":  # dW^T = dy^T x, dense because the weight is
        cots["values"] = lax.dot_general(dyf, xf, (((0,), (0,)), ((), ())), precision=_F32).astype(ct.values.dtype)
    elif ct.codec == "bitmask":
        rows, cols = packed_positions(ct)
        cots["values"] = jnp.sum(jnp.take(dyf, rows, axis=1) * jnp.take(xf, cols, axis=1), axis=0).astype(
            ct.values.dtype
        )
    if _has_scales(ct):
        if cfg.impl != "xla":  # recompute x @ codes^T with unit scales on the same impl
            unit = dataclasses.replace(ct, scales=jnp.ones_like(ct.scales))
            acc = _forward(cfg, xf, unit)[0]
        cots["scales"] = jnp.sum(dyf * acc, axis=0)
    return dx, {f: cots.get(f, jnp.zeros(a.shape, a.dtype)) for f, a in floats.items()}


def _matmul2_bwd(plan, res, dy):
    x2, ct, acc = res
    if plan.single is not None:
        dx, cots = _backward(plan.single, x2, ct, acc, dy)
    else:
        dx, cots = _per_platform(plan, _backward, x2, ct, acc, dy)
    return dx, _ct_cotangent(ct, **cots)


_matmul2.defvjp(_matmul2_fwd, _matmul2_bwd)


def _check_matmul_args(x: Any, ct: Any) -> None:
    if not isinstance(ct, CompressedTensor):
        raise ValueError(f"ltjax.matmul needs a CompressedTensor as ct, got {type(ct).__name__}")
    if ct.ndim != 2:
        raise ValueError(f"ltjax.matmul needs a 2-D CompressedTensor (logical [K, N]); got ct.shape={ct.shape}")
    shape = tuple(np.shape(x))
    if len(shape) < 1 or shape[-1] != ct.shape[0]:
        raise ValueError(
            f"ltjax.matmul: x.shape={shape} does not match ct.shape={ct.shape}: "
            f"x[..., K] @ W[K, N] needs x.shape[-1] == K == {ct.shape[0]}"
        )
    dt = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"ltjax.matmul needs a floating-point x (float32, bfloat16, float16); got x.dtype={dt} "
            f"with x.shape={shape}, ct.shape={ct.shape}"
        )


def matmul_impl(x: Any, ct: CompressedTensor, *, impl: str | None = None, platform: str | None = None) -> str:
    """The implementation ``matmul(x, ct, impl=impl)`` runs when lowered for ``platform`` (``"cpu"``,
    ``"cuda"``, ``"rocm"``; default: this host's): ``"pallas"``, ``"cuda"``, ``"ffi"``, ``"xla"`` or
    ``"reference"`` (``x`` may be a `jax.ShapeDtypeStruct`). Same dispatch as `matmul`."""
    _check_matmul_args(x, ct)
    x2 = jax.ShapeDtypeStruct((int(np.prod(np.shape(x)[:-1], dtype=np.int64)), ct.shape[0]), x.dtype)
    return _plan(x2, ct, impl).config(platform or host_platform()).impl


def matmul(x: jax.Array, ct: CompressedTensor, *, impl: str | None = None) -> jax.Array:
    """``x[..., K] @ W[K, N]`` where ``ct`` holds ``W`` (logical [K, N], the flax Dense kernel).

    Accumulates in f32 and returns ``x.dtype``. Jittable, vmappable, differentiable w.r.t.
    ``x`` and the float leaves of ``ct``. ``impl``: ``None`` (the best that can run on each
    platform the program is lowered for, see the module docstring), or one implementation on
    every platform: ``"pallas"``, ``"cuda"`` (int8 and bitmask_int8 at M <= 16,
    docs/cuda.md), ``"ffi"``, ``"xla"`` or ``"reference"``.
    """
    _check_matmul_args(x, ct)
    x = jnp.asarray(x)
    with jax.named_scope("ltjax.matmul"):
        k, n = ct.shape
        x2 = x.reshape(-1, k)
        return _matmul2(_plan(x2, ct, impl), x2, ct).reshape(x.shape[:-1] + (n,))


def matmul_reference(x: jax.Array, ct: CompressedTensor) -> jax.Array:
    """``x[..., K] @ W[K, N]`` by decoding ``W`` first (f32, returns ``x.dtype``): the ground truth."""
    w = decompress_reference(ct).astype(jnp.float32)
    y = jnp.matmul(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


# ============================================================================ decompress
def _decompress_impl(cfg: _Config, ct: CompressedTensor) -> jax.Array:
    if cfg.impl == "pallas":
        return _pallas.decompress(ct, interpret=cfg.interpret)
    if cfg.impl == "ffi":
        return from_storage(_ffi.unpack_bitmask(ct), ct.header)
    if cfg.impl == "xla":
        return _xla_decompress(ct)
    return decompress_reference(ct)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decompress(plan: _Plan, ct: CompressedTensor) -> jax.Array:
    return _per_platform(plan, _decompress_impl, ct)


def _decompress_fwd(plan, ct):
    return _decompress(plan, ct), ct


def _decompress_bwd(plan, ct, g):
    h = ct.header
    c, r = h.storage_shape
    g = jnp.asarray(g).astype(jnp.float32)
    g_st = g.reshape(c, r) if h.axis is None else jnp.moveaxis(g, h.axis, 0).reshape(c, r)
    cots: dict[str, Any] = {}
    if h.codec == "raw":
        cots["values"] = g_st.astype(ct.values.dtype)
    elif h.codec == "int8":
        cots["scales"] = jnp.sum(g_st * ct.codes.astype(jnp.float32), axis=-1)
    elif h.codec == "bitmask":
        rows, cols = packed_positions(ct)
        cots["values"] = g_st[rows, cols].astype(ct.values.dtype)
    else:
        cots["scales"] = jnp.sum(g_st * _decode_rows(ct, _base_of(ct), 0, c), axis=-1)
    return (_ct_cotangent(ct, **cots),)


_decompress.defvjp(_decompress_fwd, _decompress_bwd)


def _choose_decompress_impl(ct: CompressedTensor, impl: str | None, platform: str | None = None) -> _Config:
    """The implementation `decompress` runs on ``platform`` (default: this host's), or the forced ``impl``."""
    if impl is not None and impl not in DECOMPRESS_IMPLS:
        raise ValueError(f"{impl=} is not a decompress implementation; choose one of {DECOMPRESS_IMPLS} or None")
    has_pallas = _module_has(_pallas, "decompress")
    if impl == "pallas":
        if not has_pallas:
            raise ValueError("impl='pallas' cannot run: ltjax.pallas.decompress is not available")
        return _Config("pallas", interpret=not _is_gpu())
    ffi_ok = _backend() == "cpu" and jax.device_count() == 1 and _module_has(_ffi, "can_use_unpack", "unpack_bitmask")
    ffi_ok = ffi_ok and _ffi.can_use_unpack(ct)
    if impl == "ffi":
        if not ffi_ok:
            raise ValueError(f"impl='ffi' cannot decompress {ct!r}: the CPU handlers unpack bitmask codecs only")
        return _Config("ffi")
    if impl in ("xla", "reference"):
        return _Config(impl)
    platform = platform or host_platform()
    if _explicit_sharding(ct) is not None:  # the kernels take unsharded operands
        return _Config("xla")
    if platform in ("cuda", "rocm"):
        if has_pallas:
            return _Config("pallas")
        if platform == host_platform():
            _log_fallback_once("decompress falls back from Pallas: ltjax.pallas.decompress is not available")
    return _Config("ffi" if ffi_ok and platform == "cpu" else "xla")


def _decompress_plan(ct: CompressedTensor, impl: str | None) -> _Plan:
    if impl is not None:
        return _Plan.everywhere(_choose_decompress_impl(ct, impl))
    return _Plan(*(_choose_decompress_impl(ct, None, p) for p in PLATFORMS), default=_Config("xla"))


def decompress(ct: CompressedTensor, *, impl: str | None = None) -> jax.Array:
    """The dense logical tensor of ``ct`` (jittable; differentiable w.r.t. its float leaves).

    ``impl``: ``None`` (Pallas on GPU; on CPU the FFI unpack handler for bitmask codecs, about
    4.5× faster than XLA's gather at 4096², else the XLA decoder), ``"pallas"``, ``"ffi"``
    (bitmask codecs on CPU), ``"xla"`` or ``"reference"``.
    """
    if not isinstance(ct, CompressedTensor):
        raise ValueError(f"ltjax.decompress needs a CompressedTensor, got {type(ct).__name__}")
    with jax.named_scope("ltjax.decompress"):
        decode = functools.partial(_decompress, _decompress_plan(ct, impl))
        for _ in ct.stack_shape:  # a stack of tensors (nn.scan layers) decodes layer by layer
            decode = jax.vmap(decode)
        return decode(ct)
