"""The Pallas fast path the op layer dispatches to: `matmul`, `matmul_t`, `decompress`, `can_use_pallas`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ltjax._format import CompressedTensor, from_storage
from ltjax._numerics import split_bf16
from ltjax.pallas import _config
from ltjax.pallas._config import BlockSizes
from ltjax.pallas.bitmask_matmul import bitmask_matmul, bitmask_matmul_t
from ltjax.pallas.bitmask_unpack import bitmask_unpack
from ltjax.pallas.int4_dequant import int4_dequant
from ltjax.pallas.int4_matmul import int4_matmul, int4_matmul_t
from ltjax.pallas.int8_dequant import int8_dequant
from ltjax.pallas.int8_matmul import int8_matmul, int8_matmul_t, mosaic_reason

MATMUL_CODECS = ("raw", "int8", "bitmask", "bitmask_int8", "int4")
DECOMPRESS_CODECS = ("raw", "int8", "bitmask", "bitmask_int8", "int4")
_MAX_PACKED = 2**31 - 2**16  # packed indices are int32 in the kernels


def why_not_pallas(x, ct, *, transpose: bool = False, interpret: bool = False,
                   platform: str | None = None) -> str | None:
    """Why `matmul(x, ct)` (``transpose``: `matmul_t(x, ct)`) cannot take the Pallas path, or None if it can.

    ``platform``: the platform the program is lowered for (``"cuda"``, ``"rocm"``, ``"cpu"``;
    default: this host's backend). ``interpret=True`` drops the GPU requirement (the kernels
    then run in Pallas interpret mode, for tests).
    """
    platform = platform or jax.default_backend()
    if not interpret and platform not in ("gpu", "cuda", "rocm"):
        return f"the platform is {platform!r}, not a GPU"
    if not isinstance(ct, CompressedTensor):
        return f"the weight is a {type(ct).__name__}, not a CompressedTensor"
    if ct.codec not in MATMUL_CODECS:
        return f"codec {ct.codec!r} has no Pallas kernel (have {MATMUL_CODECS})"
    if ct.ndim != 2 or ct.header.axis is None:
        return f"the weight must be 2-D with a channel axis, got shape={ct.shape} axis={ct.header.axis}"
    if getattr(x, "ndim", None) != 2:
        return f"x must be 2-D [M, K], got shape={getattr(x, 'shape', None)}"
    if jnp.dtype(x.dtype) not in _config.X_DTYPES:
        return f"x dtype {jnp.dtype(x.dtype)} is not one of {[str(d) for d in _config.X_DTYPES]}"
    want = ct.shape[1] if transpose else ct.shape[0]
    if x.shape[1] != want:
        return f"x has {x.shape[1]} columns but the weight{'ᵀ' if transpose else ''} has {want} rows"
    if ct.codec in ("bitmask", "bitmask_int8") and ct.nnz > _MAX_PACKED:
        return f"{ct.nnz} packed nonzeros exceed the kernels' int32 indices"
    if ct.size >= 2**31:
        return f"the weight has {ct.size} elements; the kernels index with int32"
    return None


def can_use_pallas(x, ct, *, transpose: bool = False, interpret: bool = False, platform: str | None = None) -> bool:
    """True when `matmul(x, ct)` (or `matmul_t` with ``transpose``) can run the Pallas kernels."""
    return why_not_pallas(x, ct, transpose=transpose, interpret=interpret, platform=platform) is None


def kernel_backend(x, ct: CompressedTensor, *, transpose: bool = False, interpret: bool | None = None) -> str:
    """The kernel `matmul` (``transpose``: `matmul_t`) runs for these operands here: "mosaic" (the
    int8 Hopper kernel), "triton", or "xla" (a raw weight: XLA's GEMM)."""
    if ct.codec == "raw":
        return "xla"
    forward = (ct.header.axis == 1) != transpose
    if ct.codec == "int8" and forward:  # the decision `int8_matmul` takes, from the same tuned row
        bs = _config.get_block_sizes("int8_matmul", x.shape[0], x.dtype)
        if mosaic_reason(x, ct, bs, interpret=_config.resolve_interpret(interpret)) is None:
            return "mosaic"
    return "triton"


def _storage_matmul(x, ct: CompressedTensor, *, contract_cols: bool, interpret, block_sizes):
    """``x @ S.T`` (``contract_cols``) or ``x @ S`` over the storage matrix ``S`` of ``ct``."""
    if ct.codec == "raw":  # a dense weight: XLA's own GEMM is the right kernel
        s = ct.values
        cdt = _config.compute_dtype(x.dtype, s.dtype)
        y = jnp.dot(x.astype(cdt), (s.T if contract_cols else s).astype(cdt),
                    preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST if cdt == jnp.float32 else None)
        return y.astype(x.dtype)
    if ct.codec == "int8":
        f = int8_matmul if contract_cols else int8_matmul_t
        return f(x, ct, interpret=interpret, block_sizes=block_sizes)
    if ct.codec == "int4":
        f = int4_matmul if contract_cols else int4_matmul_t
        return f(x, ct, interpret=interpret, block_sizes=block_sizes)
    f = bitmask_matmul if contract_cols else bitmask_matmul_t
    if block_sizes is None and _f32_as_bf16_rows(x, ct):
        m = x.shape[0]
        if not contract_cols and ct.codec == "bitmask_int8":
            # The transposed kernel folds the scales into its activations in their dtype: bf16 here,
            # which would round them. Fold them in f32 first and hand it unit scales.
            x = x * ct.scales[None, :]
            ct = dataclasses.replace(ct, scales=jnp.ones_like(ct.scales))
        y3 = f(jnp.concatenate(split_bf16(x), axis=0), ct, interpret=interpret, out_dtype=jnp.float32)
        return y3[:m] + y3[m:2 * m] + y3[2 * m:]
    return f(x, ct, interpret=interpret, block_sizes=block_sizes)


def _f32_as_bf16_rows(x, ct: CompressedTensor) -> bool:
    """f32 activations over a bitmask weight exact in bf16 (int8 codes, bf16 values), 2 <= M <= 64: run as
    the bf16 kernel over ``[hi; mid; lo]``, three bf16 row blocks of x (`split_bf16`), summed in f32.

    Each product is exact (8-bit by 8-bit significands) and the kernel accumulates in f32, so the
    result is f32-accurate, at the bf16 kernel's speed for 3 M rows instead of the kernel's IEEE
    f32 dot on the FMA units: several times faster on an H200 at 4 <= M <= 64, though at M = 64
    still slower than decompress-then-dot, which would put a dense weight in device memory
    (figures: `docs/pallas.md`, "Paths inside the matmul kernels"). M = 1 keeps the f32 broadcast
    path; above M = 64 nothing was measured either way, so the kernel's own f32 path stays.
    """
    if jnp.dtype(x.dtype) != jnp.float32 or not 2 <= x.shape[0] <= 64:
        return False
    return ct.codec == "bitmask_int8" or (ct.codec == "bitmask" and jnp.dtype(ct.values.dtype) == jnp.bfloat16)


def _require(x, ct, transpose: bool) -> None:
    why = why_not_pallas(x, ct, transpose=transpose, interpret=True)
    if why is not None:
        raise ValueError(f"ltjax.pallas.{'matmul_t' if transpose else 'matmul'}: {why}")


def matmul(x2, ct: CompressedTensor, *, interpret: bool | None = None, block_sizes: BlockSizes | None = None):
    """``x2 [M, K] @ W [K, N] -> [M, N]`` in ``x2.dtype`` (f32 accumulation), ``W`` held by ``ct``.

    int8, int4 and bitmask codecs decode inside the kernel (registers only, no dense copy of W in
    device memory); raw goes to XLA's GEMM. ``interpret=None`` follows
    ``$LTJAX_PALLAS_INTERPRET`` (default: interpret off-GPU).
    """
    _require(x2, ct, transpose=False)
    with jax.named_scope("ltjax.pallas.matmul"):
        return _storage_matmul(x2, ct, contract_cols=ct.header.axis == 1, interpret=interpret,
                               block_sizes=block_sizes)


def matmul_t(dy2, ct: CompressedTensor, *, interpret: bool | None = None, block_sizes: BlockSizes | None = None):
    """``dy2 [M, N] @ Wᵀ [N, K] -> [M, K]`` (the input cotangent of `matmul`), decoding ``W`` in registers."""
    _require(dy2, ct, transpose=True)
    with jax.named_scope("ltjax.pallas.matmul_t"):
        return _storage_matmul(dy2, ct, contract_cols=ct.header.axis == 0, interpret=interpret,
                               block_sizes=block_sizes)


def decompress(ct: CompressedTensor, *, interpret: bool | None = None):
    """The dense logical tensor of ``ct`` (any codec, any shape) via the unpack / dequant kernels."""
    # A 2-D weight stored channel-major (axis=1: storage [N, K], logical [K, N]) is written
    # transposed by the kernel itself: the logical tensor, with no transpose pass after it.
    logical = ct.ndim == 2 and ct.header.axis == 1
    with jax.named_scope("ltjax.pallas.decompress"):
        if ct.codec == "raw":
            s, logical = ct.values, False
        elif ct.codec == "int8":
            s = int8_dequant(ct, interpret=interpret, transposed=logical)
        elif ct.codec == "int4":
            s = int4_dequant(ct, interpret=interpret, transposed=logical)
        elif ct.codec in ("bitmask", "bitmask_int8"):
            s = bitmask_unpack(ct, interpret=interpret, transposed=logical)
        else:
            raise ValueError(f"ltjax.pallas.decompress: codec {ct.codec!r} has no kernel")
        return s if logical else from_storage(s, ct.header)
