"""Tiling configuration, Triton compiler parameters and interpret-mode policy for the Pallas kernels.

Block sizes are a frozen `BlockSizes` (a static jit argument), looked up per (kernel, activation
dtype, M) in one sorted table: the built-in rows are data (``tuned/h200.json``, each naming the run
it came from), and a file named by ``$LTJAX_PALLAS_TUNED`` overrides them on another GPU. The
environment is read through `ltjax._config.settings`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from ltjax._config import settings

INTERPRET_ENV = "LTJAX_PALLAS_INTERPRET"

# Activation dtypes the matmul kernels take; weights of any `ltjax` dtype decode into them.
X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# A `BlockSizes.block_m` below this selects the broadcast multiply-reduce in registers; from
# here up the kernels take the `tl.dot` path, with M padded (masked) to at least 16 rows.
DOT_MIN_M = 8


@dataclasses.dataclass(frozen=True, slots=True)
class MosaicTiles:
    """Tiles of the int8 Mosaic GPU kernel (Hopper): TMA copies into a ring of shared-memory slots.

    Attributes:
      tile_m: weight rows (output channels) per CTA tile: 64 or 128 (wgmma's M side).
      tile_k: K columns per TMA step, a power of 2 >= 64.
      stages: shared-memory slots in flight (``max_concurrent_steps``), >= 2.
    """

    tile_m: int = 64
    tile_k: int = 128
    stages: int = 6

    def __post_init__(self):
        if self.tile_m not in (64, 128) or self.tile_k < 64 or self.tile_k & (self.tile_k - 1) or self.stages < 2:
            raise ValueError(f"MosaicTiles needs tile_m 64 or 128 (wgmma tiles), tile_k a power of 2 >= 64 "
                             f"and stages >= 2, got {self}")


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Block geometry of one kernel launch (hashable: a static argument under `jit`).

    Attributes:
      block_m: activation rows per program (a power of 2; >= 16 on the `tl.dot` path).
      block_n: storage rows (output channels) decoded per step, a power of 2.
      block_k: storage columns decoded per step, a power of 2; for the bitmask kernels a
        multiple of 32 (whole mask words), best equal to the tile's column count.
      split: programs along the reduced axis. int8: K (forward) / N (transposed) is cut
        into `split` ranges; bitmask: the tile columns (forward) / tile rows (transposed)
        are cut into `split` groups (0 = one group per tile). Partial sums are added in XLA.
      num_warps, num_stages: Triton compiler parameters. num_stages > 1 also makes the kernels'
        own walks load one step ahead: the int8 batch-1 FMA path (the next K block) and the bitmask
        forward and unpack kernels where a program's tile row fits one chunk (the next row chunk's
        gather and the one after's mask words; their loads are gathers Triton cannot stage).
      swap_ab: int8 forward `tl.dot` path only: compute ``(W x^T)^T``, the decoded weight
        block as the MMA's A operand (``block_n`` its M side) and the padded activations as B,
        instead of ``x W^T``.
      band_rows: bitmask kernels only: rows per program's tile. 0 = the stored tile's; a divisor of
        the stored tile's rows cuts each tile into row bands, one program each (more programs, each
        walking fewer rows), their packed starts counted in XLA first (`_decode.row_bands`: one
        popcount pass over the mask words, or none for a weight that carries its row starts,
        `ltjax.index_rows`). Ignored where it does not divide the tile's rows.
      mosaic: int8 forward only: `MosaicTiles` of the Mosaic GPU kernel
        (`ltjax.pallas.int8_matmul_mosaic`), taken on a Hopper GPU where the shape fits its
        tiles; the Triton fields above are the fallback everywhere else. None: Triton only.
    """

    block_m: int = 16
    block_n: int = 32
    block_k: int = 128
    split: int = 1
    num_warps: int = 4
    num_stages: int = 2
    swap_ab: bool = False
    mosaic: MosaicTiles | None = None
    band_rows: int = 0

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of 2 (Triton block shapes)")
        if self.split < 0:
            raise ValueError(f"split={self.split} must be >= 0")
        if self.band_rows < 0:
            raise ValueError(f"band_rows={self.band_rows} must be >= 0 (0: the stored tile's rows)")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} must be a power of 2 in [1, 16]")
        if isinstance(self.mosaic, dict):  # from a tuned-table file
            object.__setattr__(self, "mosaic", MosaicTiles(**self.mosaic))
        if self.mosaic is not None and not isinstance(self.mosaic, MosaicTiles):
            raise ValueError(f"mosaic={self.mosaic!r} must be a MosaicTiles or None")

    def compiler_params(self) -> plgpu.CompilerParams:
        """Triton compiler parameters: passing them selects the Triton lowering (Ampere and Hopper)."""
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


# Tuned table: (kernel, activation dtype or "*", max M) -> BlockSizes, sorted; looked up by
# `get_block_sizes`, `DEFAULT_BLOCK_SIZES` where no row covers the call; rows of a file named by
# $LTJAX_PALLAS_TUNED (`load_tuned`) take precedence. The built-in rows are data: tuned/h200.json,
# each row naming the sweep (or the offline compile check) it came from; docs/pallas.md has the figures.
BUILTIN_TUNED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned", "h200.json")
DEFAULT_BLOCK_SIZES = BlockSizes()


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


TUNED_ENV = "LTJAX_PALLAS_TUNED"
_FIELDS = ("block_m", "block_n", "block_k", "split", "num_warps", "num_stages", "swap_ab", "mosaic", "band_rows")
_tuned_cache: dict[tuple[str, float], tuple] = {}


def load_tuned(path: str) -> tuple[tuple[tuple[str, str, int], BlockSizes], ...]:
    """Rows of a tuned-table file: ``{"rows": [{"kernel", "dtype", "max_m", "block_sizes": {...}}]}``
    (other keys, e.g. a row's ``source``, are the file's record and are not read).

    `benchmarks.pallas_sweep --write-tuned` writes such a file from the block sizes it measured
    fastest on the GPU at hand; ``$LTJAX_PALLAS_TUNED`` pointing at one makes its rows take
    precedence over `TUNED_BLOCK_SIZES` (same key: replaced; new key: added).
    """
    try:
        with open(path) as f:
            doc = json.load(f)
        rows = []
        for r in doc["rows"]:
            bs = r["block_sizes"]
            unknown = set(bs) - set(_FIELDS)
            if unknown:
                raise ValueError(f"unknown BlockSizes fields {sorted(unknown)}")
            rows.append(((str(r["kernel"]), str(r["dtype"]), int(r["max_m"])), BlockSizes(**bs)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"${TUNED_ENV}={path!r} is not a readable tuned-table file: {e}") from e
    return tuple(rows)


TUNED_BLOCK_SIZES: tuple[tuple[tuple[str, str, int], BlockSizes], ...] = tuple(sorted(load_tuned(BUILTIN_TUNED)))


def tuned_table() -> tuple[tuple[tuple[str, str, int], BlockSizes], ...]:
    """`TUNED_BLOCK_SIZES`, with the rows of the file named by ``$LTJAX_PALLAS_TUNED`` (if set) on top."""
    path = settings().pallas_tuned
    if not path:
        return TUNED_BLOCK_SIZES
    key = (path, os.path.getmtime(path) if os.path.exists(path) else -1.0)
    if key not in _tuned_cache:
        table = dict(TUNED_BLOCK_SIZES)
        table.update(load_tuned(path))
        _tuned_cache[key] = tuple(sorted(table.items()))
    return _tuned_cache[key]


def get_block_sizes(kernel: str, m: int, dtype=None) -> BlockSizes:
    """The tuned block sizes of ``kernel`` for ``m`` activation rows of ``dtype``, ``block_m`` fitted to ``m``.

    The row with the smallest max M that covers ``m`` wins; on a tie, the row for the exact
    dtype beats the ``"*"`` row. Rows come from `tuned_table`.
    """
    name = "*" if dtype is None else jnp.dtype(dtype).name
    table = tuned_table()
    rows = [(max_m, dt != name, i) for i, ((kern, dt, max_m), _) in enumerate(table)
            if kern == kernel and dt in (name, "*") and m <= max_m]
    bs = table[min(rows)[2]][1] if rows else DEFAULT_BLOCK_SIZES
    return fit_block_m(bs, m)


def fit_block_m(bs: BlockSizes, m: int) -> BlockSizes:
    """Fits ``block_m`` to ``m`` rows: a ``block_m >= DOT_MIN_M`` asks for the `tl.dot` path, whose
    blocks have at least 16 rows (a batch-1 row padded, masked, to 16: on the tensor cores the
    padding is free, and the dot path streams the weight faster than the broadcast reduce even
    at M = 1); a smaller ``block_m`` is the broadcast multiply-reduce, shrunk to ``m``'s power of 2.
    """
    if bs.block_m >= DOT_MIN_M:
        bm = max(16, min(bs.block_m, next_pow2(m)))
    else:
        bm = min(bs.block_m, next_pow2(m))
    return bs if bm == bs.block_m else dataclasses.replace(bs, block_m=bm)


def fit_group(bs: BlockSizes, group: int, *, explicit: bool) -> BlockSizes:
    """``bs`` with ``block_k`` a multiple of an int4 tensor's scale ``group`` (both powers of 2: at
    least ``group``): a tuned row is widened to it, block sizes the caller chose are refused."""
    if bs.block_k >= group:
        return bs
    if explicit:
        raise ValueError(f"the int4 kernels need block_k a multiple of the scale group: {bs.block_k=}, {group=}")
    return dataclasses.replace(bs, block_k=group)


def triton_only(bs: BlockSizes, kernel: str) -> BlockSizes:
    """``bs``, or ``ValueError`` when it gives ``kernel`` (Triton only) Mosaic GPU tiles."""
    if bs.mosaic is not None:
        raise ValueError(f"{kernel} has no Mosaic GPU kernel, only a Triton one (block_sizes={bs})")
    return bs


def uses_dot(bs: BlockSizes) -> bool:
    return bs.block_m >= DOT_MIN_M


def resolve_interpret(interpret: bool | None) -> bool:
    """``interpret`` if given, else ``$LTJAX_PALLAS_INTERPRET`` ("1"/"0"), else True off-GPU."""
    if interpret is not None:
        return bool(interpret)
    env = settings().pallas_interpret
    if env is not None:
        return env
    return jax.default_backend() != "gpu"


def compute_dtype(x_dtype, w_dtype) -> jnp.dtype:
    """Dtype the decoded weight block enters the contraction in (f32 accumulation always)."""
    x_dtype, w_dtype = jnp.dtype(x_dtype), jnp.dtype(w_dtype)
    if x_dtype == jnp.float32 or w_dtype == jnp.float32:
        return jnp.dtype(jnp.float32)
    if w_dtype == jnp.int8:
        return x_dtype
    return x_dtype if x_dtype == w_dtype else jnp.dtype(jnp.float32)
