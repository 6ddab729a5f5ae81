"""The CUDA kernels for small M: ``x [M, K] @ W.T`` over int8 and bitmask_int8 weights (M <= 16),
each one XLA FFI custom call (docs/cuda.md).

The GEMVs give each output row a warp that decodes in registers (``gemv_warp.h``): int8 codes
16 per lane per 16-byte load; bitmask_int8 mask words and packed codes with byte permutes,
about 9 sm_90 instructions per weight element against the Pallas bitmask kernels' 21, which
bound those at ~40 µs of instruction issue per 8192² layer. From M = 2 bitmask_int8 runs on the
tensor cores instead: the same decode into bf16 in shared memory, 16 rows a warp, then
``ldmatrix`` and ``mma.m16n8k16``; from M = 3 int8 does too, its A fragments made in registers
straight from 16-byte loads.

Built by the package install into ``ltjax/ffi/cuda/_ltjax_cuda.so`` where ``nvcc`` is found
(``python -m ltjax.ffi.cuda --build`` builds it without an install), and registered for platform
"CUDA" at first use. The tests' emulation, ``_ltjax_cuda_emulate.so`` (``gemv_emulate.cc``: the same
per-lane code run lane by lane, the MMA's fragments placed by the PTX ISA's layouts; not a fast
path), is built only by a test install (CMake option ``LTJAX_CUDA_EMULATION``, on in ``make setup``)
and registers the same target names for platform "cpu" at first use.

`why_not` answers for the arguments and the library (or the emulation); the op layer owns the
platform. Not yet timed on a GPU: `enabled` (``LTJAX_CUDA_GEMV=1``) says whether ``impl=None`` may
pick them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ltjax._config import settings
from ltjax._format import (
    CompressedTensor,
    row_starts as _row_starts,  # the one implementation of the count
)
from ltjax._numerics import split_bf16  # the one implementation of the exact split

__all__ = [
    "CODECS",
    "EMULATION_BUILD",
    "GEMV_MAX_M",
    "INT8_MMA_TARGET",
    "INT8_TARGET",
    "MAX_M",
    "MMA_MIN_M",
    "MMA_TARGET",
    "MMA_WARPS",
    "TARGET",
    "X_DTYPES",
    "emulation_library",
    "enabled",
    "int8_mma_chunk_cols",
    "kernel_for",
    "library",
    "matmul",
    "mma_chunk_words",
    "nvcc_command",
    "row_starts",
    "seg_words",
    "why_not",
]

TARGET = "ltjax_bitmask_int8_gemv"
INT8_TARGET = "ltjax_int8_gemv"
MMA_TARGET = "ltjax_bitmask_int8_mma"
INT8_MMA_TARGET = "ltjax_int8_mma"
CODECS = ("int8", "bitmask_int8")
MAX_M = {"int8": 16, "bitmask_int8": 16}  # rows of x each codec's kernels take
GEMV_MAX_M = 4  # the GEMVs' M FMAs per code: up to 4 rows
# From here on the tensor-core kernels (one conversion per code, not M FMAs). sm_90 SASS per
# element (benchmarks/results/cuda_sass_sm90.json): bitmask_int8 GEMV 9.6 at M = 1, 10.4 at 2,
# against the MMA's 8.6; int8 GEMV 3.7 / 5.1 / 6.6 / 7.8 at M = 1 / 2 / 3 / 4, against the MMA's
# 4.2 (4.8 with f32 x from M = 3). At int8 M = 2 the GEMV stays: close, and no partial sums to add.
MMA_MIN_M = {"int8": 3, "bitmask_int8": 2}
MMA_WARPS = 4096  # K splits until the grid has about this many warps (8192^2: 512 row warps x 8); untimed
X_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
EMULATION_BUILD = "pip install -e . -C cmake.define.LTJAX_CUDA_EMULATION=ON"  # in the checkout, as make setup does


@dataclasses.dataclass(frozen=True)
class _Library:
    """One of the two builds of the four handlers: the CUDA kernels, or their CPU emulation."""

    file: str  # its name, beside this module in the install
    build_info: str  # what the install wrote beside it when it did not build it
    platform: str  # the platform its handlers register for
    suffix: str  # of its exported handler symbols: Ltjax<Kernel><suffix>
    hint: str = ""  # how to build it, where that is not the ordinary install


_CUDA = _Library("_ltjax_cuda.so", "_cuda_build_info.txt", "CUDA", "Cuda")
_EMULATION = _Library("_ltjax_cuda_emulate.so", "_cuda_emulate_build_info.txt", "cpu", "Emulated",
                      f"; it is built only for the tests: `{EMULATION_BUILD}` in the checkout, as `make setup` does")
_SYMBOLS = {TARGET: "LtjaxBitmaskInt8Gemv", INT8_TARGET: "LtjaxInt8Gemv", MMA_TARGET: "LtjaxBitmaskInt8Mma",
            INT8_MMA_TARGET: "LtjaxInt8Mma"}
_registered: dict[str, str | None] = {}  # library file: None once registered, else why not


def _install_dirs(name: str) -> list[Path]:
    """Where the install may have put ``name``: beside this file, and where the import system finds
    it (an editable install keeps built files in site-packages, not in the source tree)."""
    dirs = [Path(__file__).parent]
    try:
        spec = importlib.util.find_spec(f"{__name__}.{name.removesuffix('.so')}")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and Path(spec.origin).parent not in dirs:
        dirs.append(Path(spec.origin).parent)
    return dirs


def _find(lib: _Library) -> tuple[Path | None, str | None]:
    dirs = _install_dirs(lib.file)
    found = [d / lib.file for d in dirs if (d / lib.file).exists()]
    if found:
        return found[0], None
    infos = [d / lib.build_info for d in dirs if (d / lib.build_info).exists()]
    why = infos[0].read_text().strip() if infos else "not found in " + ", ".join(map(str, dirs))
    return None, f"{lib.file} is not built ({why}){lib.hint}"


def library() -> tuple[Path | None, str | None]:
    """The built ``_ltjax_cuda.so`` (not loaded), or None and why it is missing."""
    return _find(_CUDA)


def emulation_library() -> tuple[Path | None, str | None]:
    """The built CPU emulation ``_ltjax_cuda_emulate.so`` (not loaded), or None and why it is missing."""
    return _find(_EMULATION)


def _register(lib: _Library) -> str | None:
    """Loads ``lib`` and registers its four handlers for its platform (once); why not, or None."""
    if lib.file not in _registered:
        path, why = _find(lib)
        if path is not None:
            try:
                dll = ctypes.CDLL(str(path))
                for target, symbol in _SYMBOLS.items():
                    capsule = jax.ffi.pycapsule(getattr(dll, symbol + lib.suffix))
                    jax.ffi.register_ffi_target(target, capsule, platform=lib.platform)
            except Exception as e:  # noqa: BLE001 - any load/registration failure means "not available"
                why = f"{path} could not be loaded: {type(e).__name__}: {e}"
        _registered[lib.file] = why
    return _registered[lib.file]


def nvcc_command(out: str | os.PathLike, *extra: str) -> list[str]:
    """The nvcc line that builds ``_ltjax_cuda.so`` at ``out`` (sm_80 and sm_90, static CUDA
    runtime), as CMakeLists.txt does at install time; ``python -m ltjax.ffi.cuda --build OUT``
    runs it (benchmarks/gpu_check.sh, on a GPU machine with nvcc but no install)."""
    here = Path(__file__).parent
    return ["nvcc", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
            f"-I{jax.ffi.include_dir()}", f"-I{here}", "-gencode", "arch=compute_80,code=sm_80",
            "-gencode", "arch=compute_90,code=sm_90", *extra, "-o", str(out), str(here / "gemv_cuda.cu")]


def enabled() -> bool:
    """Whether ``impl=None`` may pick the CUDA kernels on a GPU (``LTJAX_CUDA_GEMV=1``; off until timed)."""
    return settings().cuda_gemv


def seg_words(ct: CompressedTensor) -> int | None:
    """Mask words per tile column (a power of two <= 32), 0 for one tile column, None: unsupported."""
    (_, k), (_, tc) = ct.header.storage_shape, ct.header.tile
    if tc % 32 == 0 and tc // 32 <= 32 and (tc // 32) & (tc // 32 - 1) == 0:
        return tc // 32
    return 0 if math.ceil(k / tc) == 1 else None


def why_not(x2: Any, ct: CompressedTensor, *, emulate: bool = False) -> str | None:
    """Why `matmul(x2, ct)` cannot run (None: it can): the codec, shapes and dtype, then the library
    (``emulate``: the CPU emulation, which tests build) loaded and registered. Not the platform."""
    if ct.codec not in CODECS:
        return f"the CUDA GEMV decodes {' and '.join(CODECS)}, not {ct.codec!r}"
    if ct.ndim != 2 or ct.header.axis != 1:
        return f"the CUDA GEMV needs a 2-D weight stored [N, K] (axis=1); got shape={ct.shape} axis={ct.header.axis}"
    if x2.ndim != 2 or not 1 <= x2.shape[0] <= MAX_M[ct.codec]:
        return f"the CUDA {ct.codec} kernels take 1 to {MAX_M[ct.codec]} rows of x; got x{tuple(x2.shape)}"
    if np.dtype(x2.dtype) not in X_DTYPES:
        return f"the CUDA GEMV takes float32/bfloat16/float16 x, got {np.dtype(x2.dtype)}"
    if ct.codec == "int8" and ct.shape[0] % 16:
        return f"the int8 CUDA GEMV needs K % 16 == 0 (16-byte rows); got K={ct.shape[0]}"
    if ct.codec == "bitmask_int8" and seg_words(ct) is None:
        return f"the CUDA GEMV needs tile columns of 32 * 2^i (<= 1024) or one tile column; got tile {ct.header.tile}"
    return _register(_EMULATION if emulate else _CUDA)


def row_starts(ct: CompressedTensor) -> jax.Array:
    """int32 [N * tile columns]: the packed index of row r's first value in tile column j: what ``ct``
    carries (`ltjax.index_rows`), else one popcount pass over the mask in XLA, per call."""
    return jnp.asarray(_row_starts(ct), jnp.int32)


def kernel_for(x2: Any, ct: CompressedTensor) -> str:
    """Which CUDA kernel `matmul` runs: ``"gemv"`` (FMA, one warp a row) or ``"mma"`` (from
    ``MMA_MIN_M[codec]`` rows of x: tensor cores over 16 decoded rows a warp)."""
    return "mma" if x2.shape[0] >= MMA_MIN_M[ct.codec] else "gemv"


def mma_chunk_words(n: int, w: int, seg: int, warps: int = MMA_WARPS) -> int:
    """Mask words per K split of the MMA kernel: whole tile columns (so a split starts a row's
    prefix at its tile column's start), as many splits as bring the grid to about ``warps`` warps."""
    if seg == 0 or w == 0:  # one tile column: no split (its prefix runs along the whole row)
        return max(2, w + (w & 1))
    cdiv = lambda a, b: -(-a // b)
    unit = max(2, seg)  # whole tile columns, and whole two-word steps
    splits = max(1, min(cdiv(warps, cdiv(n, 16)), cdiv(w, unit)))
    return unit * cdiv(cdiv(w, splits), unit)


def int8_mma_chunk_cols(n: int, k: int, warps: int = MMA_WARPS) -> int:
    """Columns per K split of the int8 MMA kernel: whole 64-column steps, as many splits as bring
    the grid to about ``warps`` warps."""
    cdiv = lambda a, b: -(-a // b)
    steps = cdiv(k, 64)
    splits = max(1, min(cdiv(warps, cdiv(n, 16)), steps))
    return 64 * max(1, cdiv(steps, splits))


def _mma(x2: jax.Array, ct: CompressedTensor, starts: jax.Array | None, warps: int) -> jax.Array:
    """The tensor-core kernels: x as bf16 rows (f32 and f16 x as an exact hi/mid/lo split, three
    bf16 rows each, whose three partial products are added in f32), padded to 8-row tiles and to
    the kernel's columns; the K splits' partial products added here."""
    n, k = ct.header.storage_shape
    m = x2.shape[0]
    parts = (x2.astype(jnp.bfloat16),) if x2.dtype == jnp.bfloat16 else split_bf16(x2.astype(jnp.float32))
    xb = jnp.concatenate(parts, axis=0)
    rows = xb.shape[0]
    mp = 8 * -(-rows // 8)
    if ct.codec == "int8":
        kp, chunk = 64 * -(-k // 64), int8_mma_chunk_cols(n, k, warps)
        splits = max(1, -(-kp // chunk))
        target, args, attrs = INT8_MMA_TARGET, (), dict(chunk_cols=np.int64(chunk))
    else:
        mask = jnp.asarray(ct.mask)
        w, seg = mask.shape[1], seg_words(ct)
        kp, chunk = 64 * -(-w // 2), mma_chunk_words(n, w, seg, warps)
        splits = max(1, -(-w // chunk))
        target, args, attrs = MMA_TARGET, (mask, starts), dict(seg_words=np.int64(seg), chunk_words=np.int64(chunk))
    xb = jnp.pad(xb, ((0, mp - rows), (0, kp - k)))
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((splits, mp, n), jnp.float32), vmap_method="sequential")
    y = call(xb, *args, jnp.asarray(ct.codes), jnp.asarray(ct.scales), **attrs)
    y = y.sum(axis=0)[:rows].reshape(len(parts), m, n).sum(axis=0)
    return y.astype(x2.dtype)


def matmul(x2: jax.Array, ct: CompressedTensor, *, kernel: str | None = None, mma_warps: int = MMA_WARPS) -> jax.Array:
    """``x2 [M, K] @ W.T -> [M, N]`` in x2's dtype, W the [N, K] storage of an int8 or bitmask_int8
    ``ct`` (f32 accumulation of exact code * x products, times the row's scale). ``kernel``:
    ``"gemv"`` (M <= 4) or ``"mma"`` (default `kernel_for`). ``mma_warps``: the MMA kernels cut K
    into splits until their grid has about this many warps (`benchmarks.cuda_kernels` times a few).
    bitmask_int8 reads the row starts ``ct`` carries (`ltjax.index_rows`), else counts them here,
    in XLA (`row_starts`). The handlers register at first use: the CUDA library for "CUDA", the
    emulation (where built) for "cpu"."""
    _register(_CUDA)
    _register(_EMULATION)
    kernel = kernel or kernel_for(x2, ct)
    if kernel not in ("gemv", "mma"):
        raise ValueError(f"kernel={kernel!r}: choose 'gemv', 'mma' or None")
    starts = row_starts(ct) if ct.codec == "bitmask_int8" else None
    if kernel == "mma":
        return _mma(x2, ct, starts, mma_warps)
    if x2.shape[0] > GEMV_MAX_M:
        raise ValueError(f"the CUDA GEMV takes 1 to {GEMV_MAX_M} rows of x, got x{tuple(x2.shape)}; "
                         "the MMA kernels take up to 16")
    n, k = ct.header.storage_shape
    m = x2.shape[0]
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    if ct.codec == "int8":
        call = jax.ffi.ffi_call(INT8_TARGET, out, vmap_method="sequential")
        return call(x2.astype(jnp.float32), jnp.asarray(ct.codes), jnp.asarray(ct.scales)).astype(x2.dtype)
    mask = jnp.asarray(ct.mask)
    kp = 32 * mask.shape[1]
    xf = jnp.pad(x2.astype(jnp.float32), ((0, 0), (0, kp - k)))
    # vmap: one call per batch element (ltjax.matmul folds a batched x into M before this).
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    y = call(xf, mask, starts, jnp.asarray(ct.codes), jnp.asarray(ct.scales), seg_words=np.int64(seg_words(ct)))
    return y.astype(x2.dtype)

