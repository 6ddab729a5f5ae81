"""`shard`: place a 2-D `CompressedTensor` with a `NamedSharding` written for its logical [K, N] weight."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ltjax._format import CompressedTensor, is_concrete


def _ways(mesh, entry) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def shard(ct: CompressedTensor, sharding: NamedSharding) -> CompressedTensor:
    """``ct`` with every array placed so each device holds whole tiles of its part of the weight.

    ``sharding.spec`` describes the logical ``[K, N]`` weight, e.g. ``P(None, "model")`` for
    tensor parallelism along ``N``. It is mapped onto the storage matrix ``[C, R]`` (channels
    = the channel axis): codes / values / mask words split like the weight, scales like the
    channels, and the per-tile offsets and checksums (tile-row-major) split along channel
    tiles. Each split must fall on tile boundaries, otherwise a ``ValueError`` says which.
    Bitmask codecs split along channels only, and only where every shard holds the same
    number of packed nonzeros (the packed array is split evenly). A concrete ``ct`` must pass
    `CompressedTensor.validate` (offsets, popcounts, scales; not the checksums) first.

    >>> import numpy as np, jax, ltjax
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> ct = ltjax.compress(np.ones((64, 256), np.float32), "int8", tile=(64, 64))
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    >>> ltjax.shard(ct, NamedSharding(mesh, P(None, "model"))).codes.sharding.spec
    P('model', None)
    """
    if not isinstance(sharding, NamedSharding):
        raise ValueError(f"ltjax.shard needs a jax.sharding.NamedSharding, got {type(sharding).__name__}")
    if ct.ndim != 2 or ct.header.axis is None:
        raise ValueError(f"ltjax.shard needs a 2-D tensor with a channel axis, got shape={ct.shape} "
                         f"axis={ct.header.axis}")
    if ct.checksums.ndim != 1:
        raise ValueError("ltjax.shard does not place stacked (per-layer) tensors; got arrays with leading axes")
    if is_concrete(ct):  # the split below trusts the offsets
        ct.validate(name="ltjax.shard input")
    spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    if len(spec) != 2:
        raise ValueError(f"sharding spec={sharding.spec} has more entries than the 2-D weight shape={ct.shape}")
    mesh, h = sharding.mesh, ct.header
    row, col = spec[h.axis], spec[1 - h.axis]  # storage [C, R]: rows are channels
    (c, r), (tr, tc) = h.storage_shape, h.tile
    for entry, size, tile, what in ((row, c, tr, "channels"), (col, r, tc, "columns")):
        n = _ways(mesh, entry)
        if size % n or (size // n) % tile:
            raise ValueError(
                f"cannot shard {what} of storage {h.storage_shape} (weight shape={ct.shape}) {n} ways on tile "
                f"boundaries: {size}/{n} is not a multiple of the tile's {tile}; compress with a tile that divides "
                f"{size}/{n} (ltjax.compress(..., tile=(rows, cols)) / Policy(tile=...))"
            )
    put = lambda a, *s: jax.device_put(a, NamedSharding(mesh, PartitionSpec(*s)))
    per_tile = (row,) if col is None else (None,)  # tile-row-major: contiguous only when columns are whole
    arrays = {"checksums": put(ct.checksums, *per_tile), "scales": None}
    if ct.codec == "int4":  # codes two a byte, scales and mins per group: all split like the storage matrix
        arrays["codes"] = put(ct.codes, row, col)
        arrays["scales"] = put(ct.scales, row, col)
        if ct.mins is not None:
            arrays["mins"] = put(ct.mins, row, col)
    elif ct.scales is not None:
        arrays["scales"] = put(ct.scales, row)
    if ct.codec == "raw":
        arrays["values"] = put(ct.values, row, col)
    elif ct.codec == "int8":
        arrays["codes"] = put(ct.codes, row, col)
    elif ct.codec != "int4":
        n = _ways(mesh, row)
        packed_name = "values" if ct.codec == "bitmask" else "codes"
        packed = getattr(ct, packed_name)
        offsets = np.asarray(ct.offsets)
        bounds = [int(offsets[i * len(offsets) // n]) if i < n else packed.shape[0] for i in range(n + 1)]
        per_shard = {b - a for a, b in zip(bounds, bounds[1:])}
        if col is not None or len(per_shard) != 1:
            raise ValueError(
                f"cannot shard a {ct.codec!r} tensor as {sharding.spec}: its packed nonzeros split unevenly "
                f"({sorted(per_shard)} per shard) or along columns; shard int8/raw tensors, or replicate this one"
            )
        arrays["mask"] = put(ct.mask, row, None)
        arrays["offsets"] = put(ct.offsets, row)
        arrays[packed_name] = put(packed, row)
        if ct.row_starts is not None:  # per storage row and tile column: split like the rows
            arrays["row_starts"] = put(ct.row_starts, row)
    return dataclasses.replace(ct, **arrays)
