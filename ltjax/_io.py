"""Checksummed LT-Block files: a safetensors container with the ltjax header and tree.

File layout (a valid safetensors file, readable by any safetensors reader):

* ``u64`` little-endian header length ``n``, then ``n`` bytes of JSON (space padded to 8),
  then the data bytes, every byte of which belongs to exactly one tensor.
* ``__metadata__``: ``{"format": "ltjax", "ltjax": "<json>"}`` where the ltjax JSON holds the
  format version, the tree skeleton and, per leaf, the `Header` of a compressed tensor and
  the names of its arrays, or the CRC32C of a dense array.
* Tensor ``__ltjax_header_crc__`` (``U32[1]``): the CRC32C of the JSON header bytes, so a
  flipped byte anywhere in the header is caught too.

`load` reads everything on the host, checks the length, the header CRC, the format version,
every array's shape and dtype, every tile's checksum and what the arrays hold
(`CompressedTensor.validate`), and only then moves arrays to a device. `save` writes a
temporary file beside the target, fsyncs it and renames it over the
target: a failed save leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from typing import Any

import crc32c as _crc32c
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ltjax._errors import ChecksumError, LTFormatError
from ltjax._format import FORMAT_VERSION, CompressedTensor, Header, tile_checksums, validate_arrays
from ltjax._progress import Progress, leaf_nbytes

HEADER_CRC_NAME = "__ltjax_header_crc__"
MAX_HEADER_BYTES = 100 * 1024 * 1024

_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ---------------------------------------------------------------------- tree skeleton
def _skeleton(tree: Any, leaves: list, path: str) -> dict:
    if isinstance(tree, CompressedTensor) or isinstance(tree, (np.ndarray, jax.Array, np.generic)):
        leaves.append((path, tree))
        return {"t": "leaf", "i": len(leaves) - 1}
    if tree is None:
        return {"t": "none"}
    if isinstance(tree, (bool, int, float)):
        leaves.append((path, np.asarray(tree)))
        return {"t": "leaf", "i": len(leaves) - 1, "py": type(tree).__name__}
    if isinstance(tree, Mapping):
        keys = list(tree.keys())
        for k in keys:
            if not isinstance(k, str):
                raise ValueError(f"ltjax.save supports string dict keys only; got {k!r} at {path or '<root>'}")
        return {"t": "dict", "k": keys, "v": [_skeleton(tree[k], leaves, f"{path}/{k}" if path else k) for k in keys]}
    if isinstance(tree, (list, tuple)):
        kind = "list" if isinstance(tree, list) else "tuple"
        return {"t": kind, "v": [_skeleton(v, leaves, f"{path}/{i}" if path else str(i)) for i, v in enumerate(tree)]}
    raise ValueError(
        f"ltjax.save cannot store a leaf of type {type(tree).__name__} at {path or '<root>'}: "
        "supported are dicts, lists, tuples, None, scalars, arrays and CompressedTensors"
    )


def _unskeleton(sk: dict, leaves: list) -> Any:
    t = sk.get("t")
    if t == "leaf":
        v = leaves[sk["i"]]
        py = sk.get("py")
        return {"bool": bool, "int": int, "float": float}[py](np.asarray(v)) if py else v
    if t == "none":
        return None
    if t == "dict":
        return {k: _unskeleton(v, leaves) for k, v in zip(sk["k"], sk["v"], strict=True)}
    if t in ("list", "tuple"):
        items = [_unskeleton(v, leaves) for v in sk["v"]]
        return items if t == "list" else tuple(items)
    raise LTFormatError(f"unknown tree node {t!r} in the file's tree skeleton")


# ---------------------------------------------------------------------- writing
def _st_dtype(a: np.ndarray) -> str:
    try:
        return _ST_NAMES[np.dtype(a.dtype)]
    except KeyError:
        raise ValueError(f"dtype {a.dtype} cannot be stored in a safetensors container") from None


def _encode(tree: Any, bar: Progress | None = None) -> tuple[bytes, list[np.ndarray]]:
    """The full header bytes and the arrays, in file order (validation happens here, before any I/O)."""
    leaves: list = []
    skeleton = _skeleton(tree, leaves, "")
    if bar is None:
        bar = Progress("", 0, 0, False)
    entries, arrays, names = [], [], set()

    def add(name: str, a: np.ndarray) -> str:
        if name in names:
            raise ValueError(f"two arrays would be stored under the name {name!r}")
        names.add(name)
        arrays.append((name, np.asarray(a, order="C")))
        return name

    for path, leaf in leaves:
        if isinstance(leaf, CompressedTensor):
            host = {k: np.asarray(v) for k, v in leaf.arrays().items()}
            # what load will check, minus the checksums (recomputed below); row_starts is not saved
            CompressedTensor(header=leaf.header, **host).validate(name=path)
            stack = leaf.stack_shape
            # checksums of the bytes written, layer by layer for a stacked tensor
            host["checksums"] = np.stack(
                [tile_checksums(leaf.header, {k: v[i] for k, v in host.items()}) for i in np.ndindex(*stack)]
            ).reshape(stack + (leaf.header.num_tiles,)) if stack else tile_checksums(leaf.header, host)
            entries.append(
                {
                    "path": path,
                    "kind": "compressed",
                    "header": leaf.header.to_json(),
                    "stack": list(stack),
                    "arrays": {f: add(f"{path}::{f}", a) for f, a in host.items()},
                }
            )
            bar.step(leaf_nbytes(leaf), path)
        else:
            a = np.asarray(leaf)
            _st_dtype(a)
            entries.append(
                {"path": path, "kind": "array", "name": add(path or "<root>", a),
                 "crc": _crc32c.crc32c(np.ascontiguousarray(a).tobytes())}
            )
            bar.step(a.nbytes, path)
    meta = {"version": FORMAT_VERSION, "tree": skeleton, "leaves": entries}
    return meta, arrays


def _header_bytes(meta: dict, arrays: list[tuple[str, np.ndarray]]) -> bytes:
    tensors: dict[str, Any] = {}
    offset = 4
    tensors[HEADER_CRC_NAME] = {"dtype": "U32", "shape": [1], "data_offsets": [0, 4]}
    for name, a in arrays:
        tensors[name] = {"dtype": _st_dtype(a), "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header = {"__metadata__": {"format": "ltjax", "ltjax": json.dumps(meta, separators=(",", ":"))}, **tensors}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def save(path: str | os.PathLike, tree: Any, *, progress: bool | None = None) -> None:
    """Writes a tree of arrays and `CompressedTensor`s to ``path``, atomically.

    The checksums written are those of the bytes written (recomputed here, so a tree whose
    float leaves were fine-tuned saves consistently). Every compressed tensor must pass
    `CompressedTensor.validate` first (what `load` checks), so no file is written that `load`
    would refuse. On any error the target is untouched.

    Args:
      progress: a progress bar on stderr (checksums, then writing): ``None`` (default) only on a
        terminal and for more than a few leaves or MiB, ``True`` always, ``False`` never.
    """
    path = os.fspath(path)
    leaves: list = []
    _skeleton(tree, leaves, "")
    total = sum(leaf_nbytes(l) for _, l in leaves)
    with Progress("ltjax.save: checksums", 2 * total, len(leaves), progress) as bar:
        meta, arrays = _encode(tree, bar)
        bar.phase("ltjax.save: writing")
        _write(path, meta, arrays, bar)


def _write(path: str, meta: dict, arrays: list[tuple[str, np.ndarray]], bar: Progress) -> None:
    header = _header_bytes(meta, arrays)
    crc = np.array([_crc32c.crc32c(header)], dtype=np.uint32)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            f.write(crc.tobytes())
            for name, a in arrays:
                f.write(memoryview(a.reshape(-1).view(np.uint8)))
                bar.step(a.nbytes, name.split("::")[0])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# ---------------------------------------------------------------------- reading
def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str], bytes]:
    """Reads any safetensors file on the host: (arrays by name, metadata, header bytes).

    Checks the structure (lengths, dtypes, offsets); ltjax checks come on top in `_read`.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 8:
        raise LTFormatError(f"{path}: not an ltjax file ({len(buf)} bytes is too short for a header)")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(buf):
        raise LTFormatError(
            f"{path}: not an ltjax file or truncated: header length {n} does not fit a {len(buf)}-byte file"
        )
    header_bytes = buf[8 : 8 + n]
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LTFormatError(f"{path}: not an ltjax file (its header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise LTFormatError(f"{path}: not an ltjax file (header is not a JSON object)")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict):
        raise LTFormatError(f"{path}: not an ltjax file (__metadata__ is not a JSON object)")
    data = memoryview(buf)[8 + n :]
    arrays: dict[str, np.ndarray] = {}
    end_max = 0
    spans = []
    for name, e in header.items():
        try:
            dt = _ST_DTYPES[e["dtype"]]
            shape = tuple(int(s) for s in e["shape"])
            lo, hi = (int(v) for v in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LTFormatError(f"{path}: malformed entry for tensor {name!r}: {e!r}") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if any(s < 0 for s in shape) or lo < 0 or hi < lo or hi - lo != nbytes:
            raise LTFormatError(f"{path}: tensor {name!r} has inconsistent shape {shape} and byte range [{lo}, {hi})")
        end_max = max(end_max, hi)
        spans.append((lo, hi, name, dt, shape))
    if end_max > len(data):
        raise LTFormatError(f"{path}: file is truncated: the header describes {end_max} data bytes, "
                            f"the file holds {len(data)}")
    if end_max < len(data):
        raise LTFormatError(f"{path}: {len(data) - end_max} unexpected bytes after the last tensor")
    spans.sort()
    pos = 0
    for lo, hi, name, dt, shape in spans:
        if lo != pos:
            raise LTFormatError(f"{path}: tensor {name!r} overlaps or leaves a gap in the data "
                                f"(offset {lo}, expected {pos})")
        pos = hi
        arrays[name] = np.frombuffer(data[lo:hi], dtype=dt).reshape(shape).copy()
    return arrays, {str(k): str(v) for k, v in meta.items()}, header_bytes


def _read(path: str | os.PathLike, bar: Progress | None = None) -> tuple[Any, list[tuple[str, Any]]]:
    """Reads and fully verifies an ltjax file; returns (skeleton, [(path, host leaf)])."""
    path = os.fspath(path)
    if bar is None:
        bar = Progress("", 0, 0, False)
    arrays, meta, header_bytes = read_safetensors(path)
    if meta.get("format") != "ltjax" or "ltjax" not in meta:
        raise LTFormatError(f"{path}: not an ltjax file (a safetensors file without ltjax metadata; "
                            "`ltjax compress` makes one)")
    crc = arrays.pop(HEADER_CRC_NAME, None)
    if crc is None or crc.shape != (1,) or crc.dtype != np.uint32:
        raise LTFormatError(f"{path}: not an ltjax file (no header checksum)")
    if int(crc[0]) != _crc32c.crc32c(header_bytes):
        raise ChecksumError(f"{path}: the file header is corrupt (header checksum mismatch)", tensor="<header>")
    try:
        lt = json.loads(meta["ltjax"])
        version = int(lt["version"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        lt = None
    else:
        if version > FORMAT_VERSION:
            raise LTFormatError(
                f"{path}: format version {version} is newer than this ltjax reads ({FORMAT_VERSION}): upgrade ltjax"
            )
    if lt is None:
        raise LTFormatError(f"{path}: malformed ltjax metadata")
    leaves = []
    for e in lt["leaves"]:
        p = e["path"]
        if e["kind"] == "compressed":
            try:
                header = Header.from_json(e["header"])
                host = {f: arrays[name] for f, name in e["arrays"].items()}
            except (KeyError, TypeError, ValueError, IndexError) as err:
                raise LTFormatError(f"{path}: malformed entry for tensor {p!r}: {err}") from None
            validate_arrays(header, host)
            ct = CompressedTensor(header=header, **host)
            if list(ct.stack_shape) != list(e.get("stack", [])):
                raise LTFormatError(f"{path}: tensor {p!r} has stack {ct.stack_shape}, its entry says {e.get('stack')}")
            ct.validate(checksums=True, name=p)  # every tile's CRC, then offsets / popcounts / scales
            leaves.append((p, ct))
            bar.step(ct.nbytes, p)
        elif e["kind"] == "array":
            a = arrays.get(e["name"])
            if a is None:
                raise LTFormatError(f"{path}: array for {p!r} is missing")
            if _crc32c.crc32c(a.tobytes()) != int(e["crc"]):
                raise ChecksumError(f"{path}: tensor {p!r}: checksum mismatch; the stored bytes are corrupt", tensor=p)
            leaves.append((p, a))
            bar.step(a.nbytes, p)
        else:
            raise LTFormatError(f"{path}: unknown leaf kind {e['kind']!r} for {p!r}")
    return lt["tree"], leaves


def _file_bar(desc: str, path: str | os.PathLike, progress: bool | None, phases: int = 1) -> Progress:
    """A bar over a file's data bytes (checked, then placed on a device when ``phases == 2``)."""
    if progress is False:
        return Progress(desc, 0, 0, False)
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0  # _read says what is wrong with the path
    # the leaf count is not known before the header is read: let the bytes decide in auto mode
    return Progress(desc, phases * size, 0, progress)


def load(path: str | os.PathLike, *, device: Any = None, as_numpy: bool = False, progress: bool | None = None) -> Any:
    """Reads a file written by `save`, verifying the header and every tensor first.

    Every compressed tensor passes `CompressedTensor.validate` with ``checksums=True`` (each
    tile's CRC32C, then offsets, popcounts and scales) before anything reaches a device.

    Args:
      device: a `jax.Device` or sharding for the arrays (default: JAX's default device).
      as_numpy: keep every array on the host as numpy.
      progress: a progress bar on stderr (verifying, then placing): ``None`` (default) only on a
        terminal and for a large file, ``True`` always, ``False`` never.
    """
    with _file_bar("ltjax.load: verifying", path, progress, 1 if as_numpy else 2) as bar:
        skeleton, leaves = _read(path, bar)
        host = [leaf for _, leaf in leaves]
        if not as_numpy:
            bar.phase("ltjax.load: to device")
            put = (lambda a: jax.device_put(a, device)) if device is not None else jnp.asarray
            placed = []
            for p, leaf in leaves:
                placed.append(jax.tree_util.tree_map(put, leaf))
                bar.step(leaf_nbytes(leaf), p)
            host = placed
    return _unskeleton(skeleton, host)


def verify(path: str | os.PathLike, *, progress: bool | None = None) -> dict[str, Any]:
    """Checks a file completely (structure, header checksum, every tile); raises on damage.

    Returns a summary: number of tensors, compressed tensors, tiles checked and bytes.
    ``progress``: as for `load`.
    """
    with _file_bar("ltjax.verify", path, progress) as bar:
        _, leaves = _read(path, bar)
    cts = [l for _, l in leaves if isinstance(l, CompressedTensor)]
    return {
        "path": os.fspath(path),
        "ok": True,
        "leaves": len(leaves),
        "compressed": len(cts),
        "tiles": sum(c.header.num_tiles for c in cts),
        "file_bytes": os.path.getsize(path),
    }


def read_leaves(path: str | os.PathLike, *, progress: bool | None = None) -> list[tuple[str, Any]]:
    """(path, host leaf) pairs of a verified ltjax file (for tools like the CLI)."""
    with _file_bar("ltjax: reading", path, progress) as bar:
        return _read(path, bar)[1]
