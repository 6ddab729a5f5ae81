"""int8 forward matmul on Hopper through Mosaic GPU: TMA weight loads, int8 -> bf16 in registers, wgmma.

The Triton kernel (`int8_matmul`) streams int8 weights at 1.5-1.75 TB/s on an H200 however it
is blocked (`docs/pallas.md`): its ``cp.async`` pipeline keeps too few bytes in flight. This
path hands the contraction to JAX's own warp-specialised mixed-type Hopper kernel
(`jax.experimental.pallas.ops.gpu.hopper_mixed_type_matmul_mgpu`): one producer warpgroup
issues TMA bulk copies of ``[tile_m, tile_k]`` int8 weight tiles into a ring of shared-memory
slots, two consumer warpgroups convert each tile to bf16 in registers and feed it to ``wgmma``
as the A operand. ltjax uses it transposed, ``y.T [N, M] = S [N, K] @ x.T [K, M]``, so the
weight's own storage layout ``[N, K]`` is A, and the few activation rows are the MMA's narrow
N side (padded to 32, 64 or 128 columns: 16, 32 or 64 per consumer warpgroup).

- bf16 / f16 activations run as they are; f32 ones as three bf16 columns blocks (hi, mid and lo
  of each value: `ltjax._numerics.split_bf16`) in the same call, so the weight is read once and the
  products are exact: f32 accuracy at bf16 speed, as in the Triton kernel.
- Per-row scales are applied to the small ``[N, M]`` result in XLA, with the transpose.
- Shapes it does not take (ragged N or K, too many activation columns, no Hopper GPU,
  interpret mode, a JAX without the kernel) go to the Triton kernel: `why_not_mosaic` says why.

A tuned row's `MosaicTiles` selects it (``tile_m`` weight rows per CTA tile, ``tile_k`` K
columns per TMA step, ``stages`` shared-memory slots); the row's Triton fields are the fallback.
The kernel is persistent: one CTA per SM, three warpgroups.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ltjax._format import CompressedTensor
from ltjax._numerics import split_bf16
from ltjax.pallas._config import MosaicTiles


@functools.cache
def jax_kernel():
    """``(module, None)``: JAX's mixed-type Hopper kernel, imported on first use (0.1 s, so not at
    ``import ltjax``); ``(None, error)`` where this JAX lacks it or Mosaic GPU fails to load."""
    try:  # an example kernel of JAX (0.10 and 0.11 have it), maintained and tested by JAX on Hopper
        from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as module
    except Exception as e:  # ImportError, or a Mosaic GPU that fails to initialise
        return None, e
    return module, None


# Activation columns the kernel takes in one pass (two consumer warpgroups x up to 64 each).
MAX_COLS = 128
# Shared memory a Hopper CTA may use (opt-in maximum of sm_90: 227 KiB).
SMEM_LIMIT = 227 * 1024


def _cols(m: int, dtype) -> int:
    """Activation columns (before padding) the kernel multiplies: M, or 3 M for f32 (hi/mid/lo)."""
    return 3 * m if jnp.dtype(dtype) == jnp.float32 else m


def padded_cols(m: int, dtype) -> int:
    """Columns after padding: 32, 64 or 128 (each consumer warpgroup takes half: 16, 32 or 64)."""
    c = _cols(m, dtype)
    return 32 if c <= 32 else 64 if c <= 64 else 128


def smem_bytes(tiles: MosaicTiles, cols: int, k: int) -> int:
    """Shared memory of one CTA for ``cols`` padded activation columns and ``k`` columns of weight:
    the pipeline's slots (``num_stages``, at most one per K step) of a weight tile and an
    activation tile, the epilogue's output tiles, the slots' barriers. The Mosaic GPU lowering's
    own count, byte for byte (checked in the tests)."""
    half, stages = cols // 2, min(tiles.stages, max(1, k // tiles.tile_k))
    slots = min(2, tiles.tile_m // 64)
    return stages * (tiles.tile_m * tiles.tile_k + tiles.tile_k * cols * 2 + 16) + 2 * slots * 64 * half * 4


def why_not_mosaic(x, ct: CompressedTensor, tiles: MosaicTiles, *, interpret: bool) -> str | None:
    """Why `int8_matmul_mosaic(x, ct, tiles)` cannot run here, or None when it can."""
    module, error = jax_kernel()
    if module is None:
        return f"this JAX has no Mosaic GPU mixed-type kernel ({error})"
    if interpret:
        return "interpret mode: the Mosaic GPU kernel runs natively on a Hopper GPU only"
    if jax.default_backend() != "gpu":
        return f"the default backend is {jax.default_backend()!r}, not 'gpu'"
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if cc is None or not str(cc).startswith("9."):
        return f"wgmma needs a Hopper GPU (compute capability 9.x), this one is {cc}"
    if ct.codec != "int8":
        return f"codec {ct.codec!r}: the Mosaic GPU path is int8 only"
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"x dtype {jnp.dtype(x.dtype)} is not bf16, f16 or f32"
    n, k = ct.header.storage_shape
    if n == 0 or k == 0 or x.shape[0] == 0:
        return "an empty operand"
    if n % tiles.tile_m:
        return f"{n} weight rows are not a multiple of the CTA tile ({tiles.tile_m})"
    if k % tiles.tile_k:
        return f"K = {k} is not a multiple of the TMA step ({tiles.tile_k})"
    c = _cols(x.shape[0], x.dtype)
    if c > MAX_COLS:
        return f"{c} activation columns (M = {x.shape[0]}{', x3 for f32' if c != x.shape[0] else ''}) exceed {MAX_COLS}"
    need = smem_bytes(tiles, padded_cols(x.shape[0], x.dtype), k)
    if need > SMEM_LIMIT:
        cols = padded_cols(x.shape[0], x.dtype)
        return f"{tiles} needs {need} B of shared memory for {cols} columns (limit {SMEM_LIMIT})"
    return None


def activation_columns(x) -> jax.Array:
    """``x [M, K]`` as the kernel's B operand ``[K, padded_cols]`` in bf16 (f16 stays f16).

    f32 rows become three bf16 column blocks ``[hi | mid | lo]`` whose sum is the f32 value.
    """
    m = x.shape[0]
    parts = split_bf16(x) if jnp.dtype(x.dtype) == jnp.float32 else (x,)
    cols = jnp.concatenate([p.T for p in parts], axis=1)
    return jnp.pad(cols, ((0, 0), (0, padded_cols(m, x.dtype) - cols.shape[1])))


def finish(out, m: int, scales, dtype) -> jax.Array:
    """The kernel's ``[N, padded_cols]`` f32 product back to ``[M, N]``: sum the f32 parts, scale, transpose."""
    y = out[:, :m]
    if jnp.dtype(dtype) == jnp.float32:
        y = y + out[:, m:2 * m] + out[:, 2 * m:3 * m]
    return (y * scales[:, None]).T.astype(dtype)


def tuning_config(tiles: MosaicTiles, cols: int):
    """JAX's `TuningConfig` for ``tiles`` and ``cols`` padded activation columns (two warpgroups along N)."""
    hm, half = jax_kernel()[0], cols // 2
    want = dict(tile_m=tiles.tile_m, tile_n=half, tile_k=tiles.tile_k, max_concurrent_steps=tiles.stages,
                epi_tile_m=64, epi_tile_n=half, wg_dimension=hm.MatmulDimension.N)
    missing = set(want) - {f.name for f in dataclasses.fields(hm.TuningConfig)}
    if missing:  # an example kernel of JAX: its knobs may move between releases
        raise ValueError(f"JAX {jax.__version__}'s mixed-type TuningConfig lacks {sorted(missing)}")
    return hm.TuningConfig(**want)


@functools.partial(jax.jit, static_argnames=("tiles",))
def mosaic_matmul(x, codes, scales, *, tiles: MosaicTiles):
    """The kernel call, unchecked: for callers that ran `why_not_mosaic` (`int8_matmul_mosaic` does)."""
    cols = activation_columns(x)
    config = tuning_config(tiles, cols.shape[1])
    out = jax_kernel()[0].mixed_matmul_kernel(codes, cols, out_dtype=jnp.float32, config=config)
    return finish(out, x.shape[0], scales, x.dtype)


def int8_matmul_mosaic(x, ct: CompressedTensor, tiles: MosaicTiles | None = None) -> jax.Array:
    """``x [M, K] @ S[N, K].T -> [M, N]`` on a Hopper GPU (``tiles`` default: `MosaicTiles()`); raises
    ``ValueError`` where `why_not_mosaic` objects."""
    tiles = tiles or MosaicTiles()
    why = why_not_mosaic(x, ct, tiles, interpret=False)
    if why is not None:
        raise ValueError(f"ltjax.pallas int8 Mosaic GPU matmul: {why}")
    return mosaic_matmul(x, ct.codes, ct.scales, tiles=tiles)
