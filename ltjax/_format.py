"""The LT-Block format: `CompressedTensor`, its codecs, the host packer and the jnp reference decoder.

Layout (format version 1)
-------------------------
A logical tensor ``x`` of shape ``S`` and a *channel axis* ``a`` (``-1`` → last axis for
N-D tensors, ``None`` for 0-D/1-D tensors, which form one channel) is stored as a 2-D
*storage matrix* ``X = moveaxis(x, a, 0).reshape(C, R)``: one row per channel (``C =
S[a]``), ``R = size / C`` columns. For a ``flax.linen.Dense`` kernel ``[K, N]`` this is
the output-channel-major ``[N, K]`` layout that XLA on CPU fuses into one pass.

``X`` is cut into tiles of ``tile = (tile_rows, tile_cols)``; the last tile row/column may
be ragged (nothing is padded in storage). ``tile_cols`` is a multiple of 32 unless it
spans the whole row, so a tile's mask words never straddle two tiles. Tiles are
numbered row-major over the tile grid ``(T_r, T_c)``.

Codecs and their arrays (every array is a pytree leaf):

=============  ==========================================================================
``raw``        ``values  [C, R]  dtype``
``int8``       ``codes   [C, R]  int8``, ``scales [C] float32``; ``X ≈ codes * scales[:, None]``
``bitmask``    ``mask    [C, W]  uint32`` (``W = ceil(R / 32)``; bit ``b`` of word ``w`` in
               row ``c`` is set iff ``X[c, 32 w + b]`` is nonzero, as bits: ``-0.0`` is
               kept), ``values [nnz] dtype`` (the nonzeros, tile by tile, row-major inside
               a tile), ``offsets [T_r * T_c] int32`` (exclusive prefix sum of the
               per-tile nonzero counts)
``bitmask_int8`` ``mask``, ``offsets`` as ``bitmask``, ``codes [nnz] int8``, ``scales [C] float32``
``int4``       ``codes [C, R/2] uint8`` (two 4-bit codes a byte, column ``2j`` in the low
               nibble), ``scales [C, R/G] float16`` per group of ``G = header.group``
               columns, and ``mins [C, R/G] float16`` when ``header.asymmetric``:
               ``X = (q - 8) * s`` or ``q * s + m`` (docs/int4.md)
=============  ==========================================================================

Every codec also stores ``checksums [T_r * T_c] uint32``: the CRC32C of each tile's bytes,
its rows' scales and its offset (see `tile_checksums`), so any damaged byte is pinned to
one tile.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import crc32c as _crc32c
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from ltjax._errors import ChecksumError, LTFormatError

FORMAT_VERSION = 1
CODECS = ("raw", "int8", "bitmask", "bitmask_int8", "int4")
LOSSLESS_CODECS = ("raw", "bitmask")
DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
DEFAULT_TILE_ELEMENTS = 65536  # 64 KiB of int8 payload
DEFAULT_TILE_COLS = 256
INT4_GROUPS = (32, 64, 128)
DEFAULT_INT4_GROUP = 64
_UINT_OF_WIDTH = {2: np.uint16, 4: np.uint32}


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    """The static part of a `CompressedTensor` (hashable, part of the pytree treedef)."""

    codec: str
    shape: tuple[int, ...]
    dtype: str
    axis: int | None
    tile: tuple[int, int]
    version: int = FORMAT_VERSION
    group: int = 0  # int4: columns of the storage row per scale (0: the codec has no groups)
    asymmetric: bool = False  # int4: a min per group beside its scale (else codes are centred on 8)

    @property
    def channels(self) -> int:
        return 1 if self.axis is None else self.shape[self.axis]

    @property
    def storage_shape(self) -> tuple[int, int]:
        size = math.prod(self.shape)
        c = self.channels
        return c, (size // c if c else 0)

    @property
    def tile_grid(self) -> tuple[int, int]:
        (c, r), (tr, tc) = self.storage_shape, self.tile
        return -(-c // tr), -(-r // tc)

    @property
    def num_tiles(self) -> int:
        gr, gc = self.tile_grid
        return gr * gc

    @property
    def mask_words(self) -> int:
        return -(-self.storage_shape[1] // 32)

    @property
    def groups(self) -> int:
        """Scale groups per storage row (int4), 0 without groups."""
        return self.storage_shape[1] // self.group if self.group else 0

    def to_json(self) -> dict[str, Any]:
        d = {
            "codec": self.codec,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "axis": self.axis,
            "tile": list(self.tile),
            "version": self.version,
        }
        if self.group:  # only grouped codecs carry these keys: other headers read as they always did
            d.update(group=self.group, asymmetric=self.asymmetric)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Header:
        return cls(
            codec=str(d["codec"]),
            shape=tuple(int(s) for s in d["shape"]),
            dtype=str(d["dtype"]),
            axis=None if d["axis"] is None else int(d["axis"]),
            tile=(int(d["tile"][0]), int(d["tile"][1])),
            version=int(d["version"]),
            group=int(d.get("group", 0)),
            asymmetric=bool(d.get("asymmetric", False)),
        )


_ARRAY_FIELDS = ("values", "codes", "scales", "mask", "offsets", "checksums", "mins")


HOST_ALIGNMENT = 64


def host_aligned(a: np.ndarray) -> np.ndarray:
    """``a``'s contents in a C-contiguous array whose data starts on a `HOST_ALIGNMENT` boundary."""
    buf = np.empty(a.nbytes + HOST_ALIGNMENT, np.uint8)
    start = -buf.ctypes.data % HOST_ALIGNMENT
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressedTensor:
    """A tensor kept in the LT-Block format; a JAX pytree (arrays are leaves, `header` is static).

    Invariants (checked by `validate`):
      * ``codec`` is one of ``raw``, ``int8``, ``bitmask``, ``bitmask_int8`` and exactly the
        arrays of that codec are set (module docstring), with the shapes and dtypes listed there.
      * ``int8``: ``decompress(ct) == (codes * scales[:, None]).astype(dtype)`` in storage
        order, ``|codes| <= 127``; ``scales >= 0`` at pack time (a zero scale means an all-zero channel).
      * bitmask codecs: ``offsets[t] == sum(popcount(mask words of tile u) for u < t)``,
        ``len(values or codes) == total popcount`` and the mask's padding bits (beyond column
        ``R`` of each row) are zero; decoding is exact for ``bitmask``.
      * ``int4``: ``decompress(ct)`` in storage order is ``(q - 8) * s`` (symmetric) or ``q * s + m``
        (``asymmetric``) per element, ``q`` its 4-bit code, ``s`` / ``m`` its group's scale / min.
      * ``scales`` (and ``mins``) are finite.
      * ``checksums[t]`` is the CRC32C of tile ``t`` (`tile_checksums`); it is computed at
        pack time and checked by `ltjax.load` / `verify` before data reaches a device.
      * ``row_starts`` (bitmask codecs, optional, not part of the format): int32 ``[C * T_c]``,
        `row_starts` of the mask and offsets, set by `ltjax.index_rows` so that the GPU kernels
        read each row's packed start instead of counting it from the mask in every call. It is
        derived, so it is neither saved nor checksummed; replacing ``mask`` or ``offsets`` of a
        tensor that carries it must drop it (``dataclasses.replace(ct, ..., row_starts=None)``).

    Under ``jit``/``vmap``/``grad`` the leaves may be tracers; properties read only the header.
    """

    header: Header = dataclasses.field(metadata=dict(static=True))
    values: Any = None
    codes: Any = None
    scales: Any = None
    mask: Any = None
    offsets: Any = None
    checksums: Any = None
    mins: Any = None  # int4 asymmetric: the per-group offsets
    row_starts: Any = None  # a derived index (above), not one of the format's arrays

    def __post_init__(self):
        # Host arrays are kept 64-byte aligned: jit reads an aligned numpy argument in place, and
        # copies one that is not on every call (an int8 4096x4096 GEMV: 8.4 ms instead of 1.0).
        for name in (*_ARRAY_FIELDS, "row_starts"):
            v = getattr(self, name)
            if isinstance(v, np.ndarray) and v.nbytes and v.ctypes.data % HOST_ALIGNMENT:  # (not float0 cotangents)
                object.__setattr__(self, name, host_aligned(v))

    # ---------------------------------------------------------------- properties
    @property
    def codec(self) -> str:
        return self.header.codec

    @property
    def shape(self) -> tuple[int, ...]:
        return self.header.shape

    @property
    def ndim(self) -> int:
        return len(self.header.shape)

    @property
    def size(self) -> int:
        return math.prod(self.header.shape)

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.header.dtype]

    @property
    def tile(self) -> tuple[int, int]:
        return self.header.tile

    def arrays(self) -> dict[str, Any]:
        """The codec's arrays by field name (absent fields left out): what the format stores."""
        return {f: getattr(self, f) for f in _ARRAY_FIELDS if getattr(self, f) is not None}

    def leaves(self) -> dict[str, Any]:
        """Every array the pytree holds: `arrays` and, where set, the derived ``row_starts``."""
        return {**self.arrays(), **({"row_starts": self.row_starts} if self.row_starts is not None else {})}

    @property
    def nbytes(self) -> int:
        """Every stored byte: codes or values, masks, scales, offsets and checksums."""
        return int(sum(np.dtype(a.dtype).itemsize * math.prod(a.shape) for a in self.arrays().values()))

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading axes every array carries beyond the header: a stack of same-layout tensors
        (e.g. the layers of ``nn.scan``, which slices them one at a time). ``()`` normally."""
        return tuple(self.checksums.shape[:-1]) if self.checksums is not None else ()

    def unstack(self) -> list[CompressedTensor]:
        """The tensors of a stack, in row-major order of `stack_shape` (``[self]`` if unstacked)."""
        if not self.stack_shape:
            return [self]
        return [
            CompressedTensor(header=self.header, **{k: v[idx] for k, v in self.leaves().items()})
            for idx in np.ndindex(*self.stack_shape)
        ]

    @property
    def dense_nbytes(self) -> int:
        return self.size * self.dtype.itemsize * math.prod(self.stack_shape)

    @property
    def ratio(self) -> float:
        return self.dense_nbytes / self.nbytes if self.nbytes else float("inf")

    @property
    def nnz(self) -> int:
        """Stored nonzeros for the bitmask codecs; the element count otherwise."""
        if self.codec == "bitmask":
            return int(self.values.shape[0])
        if self.codec == "bitmask_int8":
            return int(self.codes.shape[0])
        return self.size

    @property
    def T(self) -> CompressedTensor:
        """The transpose of a 2-D tensor; free, since the storage matrix is unchanged."""
        if self.ndim != 2:
            raise ValueError(f"CompressedTensor.T needs a 2-D tensor, got shape={self.shape}")
        h = self.header
        axis = None if h.axis is None else 1 - h.axis
        if h.axis is None:
            raise ValueError("CompressedTensor.T needs a tensor with a channel axis")
        return dataclasses.replace(self, header=dataclasses.replace(h, shape=h.shape[::-1], axis=axis))

    def __repr__(self) -> str:
        return (
            f"CompressedTensor(codec={self.codec!r}, shape={self.shape}, dtype={self.header.dtype}, "
            f"axis={self.header.axis}, tile={self.tile}, nbytes={self.nbytes}, ratio={self.ratio:.2f}x)"
        )

    def validate(self, *, checksums: bool = False, name: str = "tensor") -> None:
        """Checks that the tensor holds what the format promises; raises `LTFormatError` naming what is wrong.

        Always (also on traced arrays, since it reads only shapes): the header, and the shapes and
        dtypes of the codec's arrays (and of ``row_starts`` where set). Then, on concrete arrays
        (numpy or committed jax arrays; vectorised numpy on the host, every layer of a stacked
        tensor at once):

        * bitmask codecs: the mask's padding bits beyond each storage row are zero; ``offsets``
          is the exclusive prefix sum of the tiles' mask popcounts; the packed ``values`` /
          ``codes`` hold exactly the mask's total popcount; a ``row_starts`` index agrees with
          the mask and offsets.
        * int8 codecs: ``scales`` are finite and no code is ``-128`` (codes are symmetric).
        * with ``checksums=True``, first: every tile's CRC32C (`tile_checksums`; a mismatch
          raises `ChecksumError` naming the tensor and the tile).

        Called on traced arrays (inside ``jit`` / ``vmap`` / ``grad``) it raises ``ValueError``
        after the shape checks: the contents are not known there; validate before tracing.

        Which entry points run it: `ltjax.load`, `ltjax.verify` and the CLI's readers run
        ``validate(checksums=True)`` on every tensor before anything reaches a device;
        `ltjax.save` runs ``validate()`` before writing (it recomputes the checksums);
        `ltjax.shard` runs ``validate()`` on its input. `ltjax.compress` / `compress_tree`
        results are valid by construction (packed and checksummed once, on the host).

        Args:
          checksums: also recompute and compare every tile's CRC32C.
          name: the tensor's name in error messages (e.g. its tree path).
        """
        validate_arrays(self.header, self.arrays())
        if self.row_starts is not None:
            h = self.header
            want = (h.storage_shape[0] * h.tile_grid[1],)
            got = tuple(self.row_starts.shape)
            bitmask = h.codec in ("bitmask", "bitmask_int8")
            if not bitmask or np.dtype(self.row_starts.dtype) != np.int32 or got[-1:] != want:
                raise LTFormatError(
                    f"row_starts must be int32 {list(want)} (storage rows x tile columns) of a bitmask codec; got "
                    f"{np.dtype(self.row_starts.dtype)} {list(got)} for codec {h.codec!r}")
        if not is_concrete(self):
            raise ValueError(
                f"CompressedTensor.validate() on tensor {name!r}: its arrays are traced (inside jit/vmap/grad), so "
                "only their shapes and dtypes could be checked; call validate() on the concrete tensor before tracing")
        if checksums:
            verify_checksums(self, name=name)
        _check_contents(self, name)


def is_concrete(ct: CompressedTensor) -> bool:
    """Whether every array of ``ct`` holds values (numpy or jax arrays, no tracers)."""
    return not any(isinstance(a, jax.core.Tracer) for a in ct.leaves().values())


def _popcount32(a: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(a)
    return _POPCOUNT8[a.view(np.uint8)].reshape(a.shape + (4,)).sum(axis=-1, dtype=np.uint8)


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _mask_counts(header: Header, mask: np.ndarray) -> np.ndarray:
    """Set bits of a mask ``[..., C, W]`` per storage row and tile column: int64 ``[..., C, T_c]``."""
    gc, tc = header.tile_grid[1], header.tile[1]
    cnt = _popcount32(mask).astype(np.int64)
    if gc == 1:  # one tile column: every word of the row
        return cnt.sum(axis=-1, keepdims=True)
    wpt = tc // 32  # several tile columns: tc % 32 == 0, so no word straddles two tiles
    pad = gc * wpt - cnt.shape[-1]
    cnt = np.concatenate([cnt, np.zeros(cnt.shape[:-1] + (pad,), np.int64)], axis=-1) if pad else cnt
    return cnt.reshape(cnt.shape[:-1] + (gc, wpt)).sum(axis=-1)


def _check_contents(ct: CompressedTensor, name: str) -> None:
    """The value checks of `CompressedTensor.validate` (concrete arrays; shapes already checked)."""
    h = ct.header
    stack = ct.stack_shape
    where = lambda s: f"tensor {name!r}" + (f" (layer {', '.join(map(str, s))} of the stack {stack})" if stack else "")
    first = lambda bad: np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
    if ct.scales is not None:
        sc = np.asarray(ct.scales)
        bad = ~np.isfinite(sc)
        if bad.any():
            i = first(bad)
            raise LTFormatError(
                f"{where(i[:-1])}: scales[{i[-1]}] = {sc[i]} is not finite ({int(bad.sum())} non-finite scale(s))")
    if ct.mins is not None:
        mn = np.asarray(ct.mins)
        bad = ~np.isfinite(mn)
        if bad.any():
            i = first(bad)
            raise LTFormatError(f"{where(i[:-2])}: mins[{i[-2]}, {i[-1]}] = {mn[i]} is not finite "
                                f"({int(bad.sum())} non-finite min(s))")
    if h.codec in ("int8", "bitmask_int8"):
        codes = np.asarray(ct.codes)
        if codes.size and int(codes.min()) == -128:
            i = first(codes == -128)
            raise LTFormatError(
                f"{where(i[: len(stack)])}: codes[{', '.join(map(str, i[len(stack):]))}] = -128; int8 codes are "
                "symmetric (|code| <= 127), so this tensor was not written by ltjax.compress or is damaged")
    if h.codec not in ("bitmask", "bitmask_int8"):
        return
    (c, r), (tr, _) = h.storage_shape, h.tile
    gr, gc = h.tile_grid
    mask = np.asarray(ct.mask)
    if r % 32 and mask.size:
        extra = mask[..., -1] >> np.uint32(r % 32)  # bits beyond column r of the last word of each row
        if extra.any():
            i = first(extra != 0)
            raise LTFormatError(
                f"{where(i[:-1])}: mask row {i[-1]} has bits set beyond its {r} columns (padding bits of word "
                f"{h.mask_words - 1} must be zero; {int((extra != 0).sum())} row(s) affected)")
    rows = _mask_counts(h, mask)  # [..., C, T_c]
    pad = gr * tr - c
    if pad:
        rows_p = np.concatenate([rows, np.zeros(rows.shape[:-2] + (pad, gc), np.int64)], axis=-2)
    else:
        rows_p = rows
    rows_p = rows_p.reshape(stack + (gr, tr, gc))
    counts = rows_p.sum(axis=-2).reshape(stack + (gr * gc,))  # per tile, row-major over the tile grid
    want = np.cumsum(counts, axis=-1) - counts
    offsets = np.asarray(ct.offsets).astype(np.int64)
    bad = offsets != want
    if bad.any():
        i = first(bad)
        t = int(i[-1])
        prev = f"the {t} tile(s) before it hold {int(want[i])} set mask bits" if t else "it is the first tile"
        raise LTFormatError(
            f"{where(i[:-1])}: offsets[{t}] (tile {t} of {h.num_tiles}) = {int(offsets[i])}, expected {int(want[i])} "
            f"({prev}): offsets must be the exclusive prefix sum of the tiles' mask popcounts "
            f"({int(bad.sum())} tile offset(s) wrong)")
    packed_name = "values" if h.codec == "bitmask" else "codes"
    n_packed = int(getattr(ct, packed_name).shape[len(stack)])
    total = counts.sum(axis=-1)
    bad = total != n_packed
    if bad.any():
        i = first(bad) if stack else ()
        tot = int(total[i]) if stack else int(total)
        raise LTFormatError(
            f"{where(i)}: the packed {packed_name} hold {n_packed} entries but the mask has {tot} set bits "
            "(one packed entry per set bit)")
    if ct.row_starts is not None:
        rs = np.asarray(ct.row_starts).astype(np.int64)
        starts = offsets.reshape(stack + (gr, 1, gc)) + np.cumsum(rows_p, axis=-2) - rows_p
        starts = starts.reshape(stack + (gr * tr, gc))[..., :c, :].reshape(stack + (c * gc,))
        if rs.shape != starts.shape:
            raise LTFormatError(f"{where(())}: row_starts has shape {list(rs.shape)}, expected {list(starts.shape)}")
        bad = rs != starts
        if bad.any():
            i = first(bad)
            row, col = divmod(int(i[-1]), gc)
            raise LTFormatError(
                f"{where(i[:-1])}: row_starts[{int(i[-1])}] (row {row}, tile column {col}) = {int(rs[i])}, expected "
                f"{int(starts[i])} from the mask and offsets: a stale index (drop it with "
                "dataclasses.replace(ct, row_starts=None), then ltjax.index_rows again)")


# ---------------------------------------------------------------------- geometry
def normalize_axis(shape: tuple[int, ...], axis: int | None | str = "default") -> int | None:
    if axis == "default":
        axis = -1 if len(shape) >= 2 else None
    if axis is None:
        return None
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis={axis} is out of range for a tensor of shape={shape}")
    return axis % len(shape)


def choose_tile(storage_shape: tuple[int, int], tile: int | tuple[int, int] | None) -> tuple[int, int]:
    """Tile geometry for a storage matrix: an element count or explicit ``(rows, cols)``."""
    c, r = storage_shape
    if tile is None:
        tile = DEFAULT_TILE_ELEMENTS
    if isinstance(tile, (int, np.integer)):
        if tile < 32:
            raise ValueError(f"tile={tile} elements cannot fit: a tile holds at least 32 elements")
        tc = r if r <= DEFAULT_TILE_COLS else DEFAULT_TILE_COLS
        tc = max(tc, 1)
        tr = max(1, min(max(c, 1), int(tile) // tc))
        return tr, tc
    if len(tile) != 2 or any(int(t) < 1 for t in tile):
        raise ValueError(f"tile={tile!r} cannot fit: give an element count or (rows, cols) >= 1")
    tr, tc = min(int(tile[0]), max(c, 1)), min(int(tile[1]), max(r, 1))
    if tc < r and tc % 32:
        raise ValueError(
            f"tile={tuple(tile)} cannot fit a storage matrix of {storage_shape}: tile cols={tc} must be "
            f"a multiple of 32 (mask words) or span the whole row ({r})"
        )
    return tr, tc


def group_reason(storage_shape: tuple[int, int], tile: tuple[int, int], group: int) -> str | None:
    """Why an int4 tensor of this storage and tile geometry cannot have scale groups of ``group``
    columns (None: it can): groups must tile each storage row and each tile exactly."""
    r, tc = storage_shape[1], tile[1]
    if group not in INT4_GROUPS:
        return f"int4 group={group} is not one of {INT4_GROUPS}"
    if r % group:
        return (f"int4 needs the reduction axis (storage row of {r} columns) to be a multiple of group={group}; "
                f"use a group dividing {r} or another codec")
    if tc % group:
        return f"int4 tile columns ({tc}) must be a multiple of group={group}"
    return None


def _tile_bounds(header: Header):
    (c, r), (tr, tc) = header.storage_shape, header.tile
    gr, gc = header.tile_grid
    for i in range(gr):
        for j in range(gc):
            yield i * gc + j, i * tr, min(c, (i + 1) * tr), j * tc, min(r, (j + 1) * tc)


# ---------------------------------------------------------------------- validation
def expected_arrays(header: Header, nnz: int | None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes a codec's arrays must have (``nnz`` from the stored values)."""
    c, r = header.storage_shape
    dt = DTYPES[header.dtype]
    t = header.num_tiles
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {"checksums": ((t,), np.dtype(np.uint32))}
    if header.codec == "raw":
        out["values"] = ((c, r), dt)
    elif header.codec == "int8":
        out["codes"] = ((c, r), np.dtype(np.int8))
        out["scales"] = ((c,), np.dtype(np.float32))
    elif header.codec == "int4":
        out["codes"] = ((c, r // 2), np.dtype(np.uint8))
        out["scales"] = ((c, header.groups), np.dtype(np.float16))
        if header.asymmetric:
            out["mins"] = ((c, header.groups), np.dtype(np.float16))
    else:
        out["mask"] = ((c, header.mask_words), np.dtype(np.uint32))
        out["offsets"] = ((t,), np.dtype(np.int32))
        if header.codec == "bitmask":
            out["values"] = ((nnz,), dt)
        else:
            out["codes"] = ((nnz,), np.dtype(np.int8))
            out["scales"] = ((c,), np.dtype(np.float32))
    return out


def validate_header(header: Header) -> None:
    if header.version > FORMAT_VERSION:
        raise LTFormatError(
            f"format version {header.version} is newer than this ltjax reads ({FORMAT_VERSION}): upgrade ltjax"
        )
    if header.version < 1:
        raise LTFormatError(f"invalid format version {header.version}")
    if header.codec not in CODECS:
        raise LTFormatError(f"unknown codec {header.codec!r}; known: {CODECS}")
    if header.dtype not in DTYPES:
        raise LTFormatError(f"unsupported dtype {header.dtype!r}; supported: {tuple(DTYPES)}")
    if any(s < 0 for s in header.shape):
        raise LTFormatError(f"negative dimension in shape={header.shape}")
    if header.axis is not None and not 0 <= header.axis < len(header.shape):
        raise LTFormatError(f"axis={header.axis} out of range for shape={header.shape}")
    try:
        tile = choose_tile(header.storage_shape, header.tile)
    except ValueError as e:
        raise LTFormatError(str(e)) from None
    if tile != header.tile:
        raise LTFormatError(f"tile={header.tile} does not fit storage {header.storage_shape}")
    why = group_reason(header.storage_shape, header.tile, header.group) if header.codec == "int4" else None
    if why is not None:
        raise LTFormatError(why)
    if header.codec != "int4" and (header.group or header.asymmetric):
        raise LTFormatError(f"codec {header.codec!r} has no groups (group={header.group}, "
                            f"asymmetric={header.asymmetric})")


def validate_arrays(header: Header, arrays: dict[str, Any]) -> None:
    validate_header(header)
    ck = arrays.get("checksums")
    stack = tuple(ck.shape[:-1]) if ck is not None and len(ck.shape) >= 1 else ()
    nnz = None
    if header.codec == "bitmask" and arrays.get("values") is not None and len(arrays["values"].shape) > len(stack):
        nnz = int(arrays["values"].shape[len(stack)])
    if header.codec == "bitmask_int8" and arrays.get("codes") is not None and len(arrays["codes"].shape) > len(stack):
        nnz = int(arrays["codes"].shape[len(stack)])
    want = expected_arrays(header, nnz)
    if set(arrays) != set(want):
        raise LTFormatError(f"codec {header.codec!r} needs arrays {sorted(want)}, got {sorted(arrays)}")
    for name, (shape, dt) in want.items():
        a = arrays[name]
        shape = stack + shape
        if tuple(a.shape) != shape or np.dtype(a.dtype) != dt:
            raise LTFormatError(
                f"array {name!r} of codec {header.codec!r} has shape={tuple(a.shape)} dtype={np.dtype(a.dtype)}, "
                f"expected shape={shape} dtype={dt}"
            )


# ---------------------------------------------------------------------- host packer
def _as_numpy(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    dt = a.dtype
    if dt not in DTYPES.values():
        raise ValueError(
            f"tensor {name!r} has unsupported dtype {dt}; supported: {', '.join(DTYPES)} "
            f"(cast first, e.g. x.astype(np.float32))"
        )
    return a


def check_finite(a: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(a.astype(np.float32, copy=False))
    n = int(bad.sum())
    if n:
        nan = int(np.isnan(a.astype(np.float32, copy=False)).sum())
        raise ValueError(f"tensor {name!r} has {n} non-finite values ({nan} NaN, {n - nan} Inf); cannot compress it")


def to_storage(a: np.ndarray, axis: int | None) -> np.ndarray:
    """The [C, R] storage matrix of a logical array (a view where possible)."""
    if axis is None:
        return a.reshape(1, a.size)
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def _nonzero_bits(x2: np.ndarray) -> np.ndarray:
    return x2.view(_UINT_OF_WIDTH[x2.dtype.itemsize]) != 0


def _pack_mask(nz: np.ndarray) -> np.ndarray:
    c, r = nz.shape
    w = -(-r // 32)
    padded = np.zeros((c, w * 32), dtype=bool)
    padded[:, :r] = nz
    return np.packbits(padded, axis=1, bitorder="little").view("<u4").reshape(c, w).astype(np.uint32)


def _tile_order(x2: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    """Elements of the storage matrix reordered tile by tile, row-major inside each tile (zero padded)."""
    c, r = x2.shape
    tr, tc = tile
    gr, gc = -(-c // tr), -(-r // tc)
    if (gr * tr, gc * tc) != (c, r):
        p = np.zeros((gr * tr, gc * tc), dtype=x2.dtype)
        p[:c, :r] = x2
        x2 = p
    return x2.reshape(gr, tr, gc, tc).transpose(0, 2, 1, 3).reshape(gr * gc, tr * tc)


def int8_quantize(x2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: ``codes = round(x / s)``, ``s = max|x| / 127`` (f32)."""
    xf = x2.astype(np.float32, copy=False)
    scales = (np.abs(xf).max(axis=1) / np.float32(127.0)).astype(np.float32) if xf.size else np.zeros(
        (x2.shape[0],), np.float32
    )
    safe = np.where(scales > 0, scales, np.float32(1.0))
    codes = np.clip(np.rint(xf / safe[:, None]), -127, 127).astype(np.int8)
    return codes, scales


def int4_quantize(x2: np.ndarray, group: int, asymmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest int4 per group of ``group`` columns (llama.cpp's Q4_0 / Q4_1 rules):
    (codes uint8 [C, R/2] two a byte, scales float16 [C, R/G], mins float16 [C, R/G] or None).

    Symmetric: the group's largest-magnitude value maps to code 0 (``s = x_max / -8``), so the
    codes span -8..7 around 8. Asymmetric: ``s = (max - min) / 15``, ``m = min``. Codes are
    rounded against the float16 scale (and min) that decoding uses.
    """
    c, r = x2.shape
    g = x2.astype(np.float32, copy=False).reshape(c, r // group, group)
    if asymmetric:
        lo, hi = g.min(axis=-1), g.max(axis=-1)
        scales = _f16_scale((hi - lo) / np.float32(15.0))
        mins = lo.astype(np.float16)
        inv = np.where(scales != 0, 1.0 / np.where(scales != 0, scales, 1).astype(np.float32), 0).astype(np.float32)
        q = np.rint((g - mins.astype(np.float32)[..., None]) * inv[..., None])
    else:
        idx = np.abs(g).argmax(axis=-1)
        amax = np.take_along_axis(g, idx[..., None], axis=-1)[..., 0]
        scales = _f16_scale(amax / np.float32(-8.0))
        mins = None
        inv = np.where(scales != 0, 1.0 / np.where(scales != 0, scales, 1).astype(np.float32), 0).astype(np.float32)
        q = np.rint(g * inv[..., None]) + 8
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(c, r)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8), scales, mins


def _f16_scale(s: np.ndarray) -> np.ndarray:
    """Scales as float16, refusing what float16 cannot hold (a group scale is tiny but not zero, or huge)."""
    a = np.abs(s)
    bad = (a > 65504.0) | ((a > 0) & (a < 2.0**-14))
    if bad.any():
        v = float(s[np.unravel_index(int(np.flatnonzero(bad)[0]), s.shape)])
        raise ValueError(f"int4 keeps group scales in float16; a scale of {v:.3g} is outside its normal range "
                         "(2^-14 to 65504): rescale the tensor or use int8")
    return s.astype(np.float16)


def prepare(x: Any, *, name: str, axis: int | None | str,
            tile) -> tuple[np.ndarray, int | None, np.ndarray, tuple[int, int]]:
    """Checks a host tensor (dtype, empty, non-finite) and lays it out: (array, axis, storage, tile)."""
    a = _as_numpy(x, name)
    if a.size == 0:
        raise ValueError(f"tensor {name!r} is empty (shape={a.shape}); nothing to compress")
    check_finite(a, name)
    ax = normalize_axis(a.shape, axis)
    x2 = to_storage(a, ax)
    return a, ax, x2, choose_tile(x2.shape, tile)


def pack(
    x: Any,
    codec: str,
    *,
    tile: int | tuple[int, int] | None = None,
    axis: int | None | str = "default",
    name: str = "tensor",
    group: int | None = None,
    asymmetric: bool = False,
    int4: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
) -> CompressedTensor:
    """Packs a host array into one codec. Vectorised numpy; checksums computed here, once.

    ``group`` / ``asymmetric``: int4's scale groups (default `DEFAULT_INT4_GROUP`, symmetric).
    ``int4``: the codes, scales and mins of an int4 tensor computed elsewhere (a calibrated
    quantizer, a GGUF file), in `int4_quantize`'s layout; ``x`` then only gives shape and dtype.
    """
    if codec not in CODECS:
        raise ValueError(f"{codec=} is not a codec; choose one of {CODECS}")
    if codec != "int4" and (group is not None or asymmetric or int4 is not None):
        raise ValueError(f"group / asymmetric / int4 arrays apply to codec 'int4', not {codec!r}")
    a, ax, x2, tile_rc = prepare(x, name=name, axis=axis, tile=tile)
    group = (DEFAULT_INT4_GROUP if group is None else int(group)) if codec == "int4" else 0
    if codec == "int4":
        why = group_reason(x2.shape, tile_rc, group)
        if why is not None:
            raise ValueError(f"tensor {name!r}: {why}")
    header = Header(
        codec=codec,
        shape=tuple(int(s) for s in a.shape),
        dtype=_dtype_name(a.dtype),
        axis=ax,
        tile=tile_rc,
        group=group,
        asymmetric=bool(asymmetric) if codec == "int4" else False,
    )
    arrays: dict[str, np.ndarray] = {}
    if codec == "raw":
        arrays["values"] = np.ascontiguousarray(x2)
    elif codec == "int8":
        arrays["codes"], arrays["scales"] = int8_quantize(x2)
    elif codec == "int4":
        codes, scales, mins = int4_quantize(x2, group, header.asymmetric) if int4 is None else int4
        arrays["codes"], arrays["scales"] = np.asarray(codes, np.uint8), np.asarray(scales, np.float16)
        if header.asymmetric:
            arrays["mins"] = np.asarray(mins, np.float16)
        validate_arrays(header, {**arrays, "checksums": np.zeros((header.num_tiles,), np.uint32)})
    else:
        nz = _nonzero_bits(x2)
        arrays["mask"] = _pack_mask(nz)
        nz_t = _tile_order(nz, tile_rc)
        counts = nz_t.sum(axis=1, dtype=np.int64)
        arrays["offsets"] = (np.cumsum(counts) - counts).astype(np.int32)
        if counts.sum() >= 2**31:
            raise ValueError(f"tensor {name!r} has {counts.sum()} nonzeros; the format's int32 offsets hold < 2**31")
        if codec == "bitmask":
            arrays["values"] = _tile_order(x2, tile_rc)[nz_t]
        else:
            codes, arrays["scales"] = int8_quantize(x2)
            arrays["codes"] = _tile_order(codes, tile_rc)[nz_t]
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    arrays["checksums"] = tile_checksums(header, arrays)
    return CompressedTensor(header=header, **arrays)


def _dtype_name(dt: np.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dt:
            return k
    raise ValueError(f"unsupported dtype {dt}")


# ---------------------------------------------------------------------- checksums
def tile_checksums(header: Header, arrays: dict[str, Any]) -> np.ndarray:
    """CRC32C per tile over: payload of the tile, its mask words, its rows' scales, its offset.

    For the bitmask codecs the payload of tile ``t`` is ``values[offsets[t]:offsets[t+1]]``.
    """
    a = {k: np.asarray(v) for k, v in arrays.items() if k != "checksums" and v is not None}
    out = np.zeros((header.num_tiles,), np.uint32)
    n_packed = None
    packed = {"bitmask": a.get("values"), "bitmask_int8": a.get("codes")}.get(header.codec)
    if packed is not None:
        n_packed = packed.shape[0]
    offsets = a.get("offsets")
    for t, r0, r1, c0, c1 in _tile_bounds(header):
        crc = 0
        if header.codec == "raw":
            crc = _crc32c.crc32c(np.ascontiguousarray(a["values"][r0:r1, c0:c1]).tobytes(), crc)
        elif header.codec == "int8":
            crc = _crc32c.crc32c(np.ascontiguousarray(a["codes"][r0:r1, c0:c1]).tobytes(), crc)
        elif header.codec == "int4":  # the tile's code bytes, then its groups' scales (and mins)
            g0, g1 = c0 // header.group, c1 // header.group
            crc = _crc32c.crc32c(np.ascontiguousarray(a["codes"][r0:r1, c0 // 2:c1 // 2]).tobytes(), crc)
            for f in ("scales", "mins"):
                if f in a:
                    crc = _crc32c.crc32c(np.ascontiguousarray(a[f][r0:r1, g0:g1]).tobytes(), crc)
            out[t] = crc
            continue
        else:
            w0, w1 = c0 // 32, -(-c1 // 32)
            crc = _crc32c.crc32c(np.ascontiguousarray(a["mask"][r0:r1, w0:w1]).tobytes(), crc)
            lo = int(offsets[t])
            hi = int(offsets[t + 1]) if t + 1 < header.num_tiles else n_packed
            lo, hi = max(0, min(lo, n_packed)), max(0, min(hi, n_packed))
            crc = _crc32c.crc32c(np.ascontiguousarray(packed[lo:hi]).tobytes(), crc)
            crc = _crc32c.crc32c(offsets[t : t + 1].tobytes(), crc)
        if "scales" in a:
            crc = _crc32c.crc32c(np.ascontiguousarray(a["scales"][r0:r1]).tobytes(), crc)
        out[t] = crc
    return out


def verify_checksums(ct: CompressedTensor, name: str = "tensor") -> None:
    """Raises `ChecksumError` naming the first damaged tile of ``ct`` (host arrays).

    Only the CRC32Cs; `CompressedTensor.validate` (``checksums=True``) runs this and the
    checks of what the arrays hold (offsets, popcounts, scales).
    """
    if ct.stack_shape:
        for idx, layer in zip(np.ndindex(*ct.stack_shape), ct.unstack()):
            verify_checksums(layer, name=f"{name}[{', '.join(map(str, idx))}]")
        return
    arrays = {k: np.asarray(v) for k, v in ct.arrays().items()}
    got = tile_checksums(ct.header, arrays)
    bad = np.flatnonzero(got != arrays["checksums"])
    if bad.size:
        t = int(bad[0])
        raise ChecksumError(
            f"tensor {name!r}: checksum mismatch in tile {t} of {ct.header.num_tiles} "
            f"({bad.size} damaged tile(s)); the stored bytes are corrupt",
            tensor=name,
            tile=t,
        )


# ---------------------------------------------------------------------- jnp reference decoder
def unpack_mask(mask: jax.Array, r: int) -> jax.Array:
    """uint32 mask words [C, W] → bool [C, r] (bit b of word w is column 32 w + b)."""
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    return bits.reshape(mask.shape[0], -1)[:, :r].astype(bool)


def packed_index(header: Header, bits: jax.Array, offsets: jax.Array) -> jax.Array:
    """For each storage element, its index into the packed values (valid where ``bits``)."""
    (c, r), (tr, tc) = header.storage_shape, header.tile
    gr, gc = header.tile_grid
    b = jnp.pad(bits.astype(jnp.int32), ((0, gr * tr - c), (0, gc * tc - r)))
    b = b.reshape(gr, tr, gc, tc).transpose(0, 2, 1, 3).reshape(gr, gc, tr * tc)
    rank = jnp.cumsum(b, axis=-1) - b + offsets.reshape(gr, gc, 1)
    rank = rank.reshape(gr, gc, tr, tc).transpose(0, 2, 1, 3).reshape(gr * tr, gc * tc)
    return rank[:c, :r]


def row_starts(ct: CompressedTensor) -> jax.Array:
    """int32 ``[C * T_c]``: for storage row ``r`` and tile column ``j``, the packed index of the row's
    first nonzero in tile column ``j`` (row-major over rows, then tile columns), for the bitmask codecs.

    A tile stores its values row by row, so that is the tile's offset plus the popcount of the
    tile's rows above ``r``: one popcount pass over the mask words (pure jnp), unless ``ct``
    carries them (`ltjax.index_rows`) or its tiles are one row high (then they are the offsets).
    """
    h = ct.header
    if h.codec not in ("bitmask", "bitmask_int8"):
        raise ValueError(f"row_starts needs a bitmask codec, got {h.codec!r}")
    if ct.row_starts is not None:
        return ct.row_starts
    (c, _), (tr, tc) = h.storage_shape, h.tile
    gr, gc = h.tile_grid
    offsets = jnp.asarray(ct.offsets)
    if tr == 1:
        return offsets
    # [C, W]; a tile's words never straddle two tiles
    cnt = lax.population_count(jnp.asarray(ct.mask)).astype(jnp.int32)
    if gc == 1:
        cnt = cnt.sum(axis=1, keepdims=True)
    else:  # tc % 32 == 0 when more than one tile spans a row
        wpt = tc // 32
        cnt = jnp.pad(cnt, ((0, 0), (0, gc * wpt - cnt.shape[1]))).reshape(c, gc, wpt).sum(axis=2)
    cnt = jnp.pad(cnt, ((0, gr * tr - c), (0, 0))).reshape(gr, tr, gc)
    starts = offsets.reshape(gr, 1, gc) + jnp.cumsum(cnt, axis=1) - cnt
    return starts.reshape(gr * tr, gc)[:c].reshape(-1)


def index_rows(tree: Any) -> Any:
    """``tree`` with every bitmask `CompressedTensor` in it carrying its `row_starts`.

    The GPU kernels over bitmask weights need each row's packed start per tile column. Without
    this index each call counts them from the mask in XLA (one pass over the mask words, a few
    µs per 8192² layer, paid per call: per layer and per token in a decode step that takes the
    weights as arguments); with it they read them. It costs 4 bytes per row and tile column
    (1/64 byte per element with 256-column tiles) of device memory. Not saved by `ltjax.save`;
    index after loading. Other leaves pass through; tensors that carry the index keep it.

    >>> import numpy as np, ltjax
    >>> w = np.where(np.random.default_rng(0).random((64, 96)) < 0.5, 0.0, 1.0).astype(np.float32)
    >>> ct = ltjax.index_rows(ltjax.compress(w, "bitmask_int8", tile=(32, 64)))
    >>> ct.row_starts.shape  # storage [96 output channels, 64]: 96 rows x 1 tile column of 64
    (96,)
    """

    def index(leaf):
        if not isinstance(leaf, CompressedTensor) or leaf.codec not in ("bitmask", "bitmask_int8"):
            return leaf
        if leaf.row_starts is not None:
            return leaf
        starts = row_starts
        for _ in leaf.stack_shape:
            starts = jax.vmap(starts)
        return dataclasses.replace(leaf, row_starts=starts(leaf))

    return jax.tree.map(index, tree, is_leaf=lambda x: isinstance(x, CompressedTensor))


def decode_storage(ct: CompressedTensor, dtype=None) -> jax.Array:
    """The [C, R] storage matrix in ``dtype`` (default: the logical dtype). Pure jnp."""
    h = ct.header
    dtype = ct.dtype if dtype is None else dtype
    c, r = h.storage_shape
    if h.codec == "raw":
        return jnp.asarray(ct.values).astype(dtype)
    if h.codec == "int8":
        return (jnp.asarray(ct.codes).astype(jnp.float32) * jnp.asarray(ct.scales)[:, None]).astype(dtype)
    if h.codec == "int4":
        return int4_dequantize(h, ct.codes, ct.scales, ct.mins).astype(dtype)
    bits = unpack_mask(jnp.asarray(ct.mask), r)
    packed = jnp.asarray(ct.values if h.codec == "bitmask" else ct.codes)
    if packed.shape[0] == 0:
        return jnp.zeros((c, r), dtype)
    idx = packed_index(h, bits, jnp.asarray(ct.offsets))
    gathered = jnp.take(packed, jnp.clip(idx, 0, packed.shape[0] - 1), axis=0)
    if h.codec == "bitmask":
        return jnp.where(bits, gathered, jnp.zeros((), packed.dtype)).astype(dtype)
    dense = jnp.where(bits, gathered.astype(jnp.float32), 0.0) * jnp.asarray(ct.scales)[:, None]
    return dense.astype(dtype)


def int4_nibbles(codes: jax.Array) -> jax.Array:
    """uint8 ``[..., R/2]`` two codes a byte → int32 ``[..., R]`` codes 0..15 (low nibble first)."""
    c = jnp.asarray(codes).astype(jnp.int32)
    return jnp.stack([c & 15, c >> 4], axis=-1).reshape(c.shape[:-1] + (c.shape[-1] * 2,))


def int4_dequantize(header: Header, codes: jax.Array, scales: jax.Array, mins: jax.Array | None) -> jax.Array:
    """f32 rows ``[..., R]`` of an int4 tensor's storage (``codes [..., R/2]``, its rows' groups' scales and mins)."""
    q = int4_nibbles(codes).astype(jnp.float32)
    q = q.reshape(q.shape[:-1] + (q.shape[-1] // header.group, header.group))
    s = jnp.asarray(scales).astype(jnp.float32)[..., None]
    x = q * s + jnp.asarray(mins).astype(jnp.float32)[..., None] if header.asymmetric else (q - 8.0) * s
    return x.reshape(q.shape[:-2] + (q.shape[-2] * header.group,))


def from_storage(x2: jax.Array, header: Header) -> jax.Array:
    """Inverse of `to_storage`, in jnp."""
    if header.axis is None:
        return x2.reshape(header.shape)
    rest = header.shape[: header.axis] + header.shape[header.axis + 1 :]
    return jnp.moveaxis(x2.reshape((header.channels,) + rest), 0, header.axis)


def decompress_reference(ct: CompressedTensor) -> jax.Array:
    """The dense logical tensor, in pure jnp: the numerical ground truth of every decoder.

    A stacked tensor (`CompressedTensor.stack_shape`) decodes to ``stack_shape + shape``.
    """
    decode = lambda c: from_storage(decode_storage(c), c.header)
    for _ in ct.stack_shape:
        decode = jax.vmap(decode)
    return decode(ct)
