"""GGML quantized blocks (GGUF files) as ltjax tensors, with no second rounding.

llama.cpp stores a weight ``[rows, cols]`` (numpy order: ``[out, in]`` for a linear layer, which is
ltjax's storage ``[C, R]`` of a Dense kernel ``[in, out]``) as blocks of 32 consecutive elements of
a row. The blocks map onto ltjax codecs as follows:

=========  =========================================  ==========================================
GGML type  block (bytes)                              ltjax
=========  =========================================  ==========================================
Q4_0       f16 ``d``, 16 bytes of nibbles: byte ``j``  ``int4``, group 32, symmetric:
           holds element ``j`` (low), ``j + 16``        ``(q - 8) * d``, bit for bit
           (high); value ``d * (q - 8)``
Q4_1       f16 ``d``, f16 ``m``, the same 16 bytes;     ``int4``, group 32, asymmetric:
           value ``d * q + m``                          ``q * d + m``, bit for bit
Q8_0       f16 ``d``, 32 int8 ``q``; value ``d * q``    ``int8`` only where every block of every
                                                        row has the same ``d`` (ltjax's int8 has
                                                        ONE f32 scale per row); otherwise the
                                                        exact f32 values (``q8_0="exact"``) or a
                                                        per-row int8 requantisation of them
                                                        (``q8_0="int8"``: a second rounding)
F32/F16/   the values                                   the values (f32), uncompressed
BF16
=========  =========================================  ==========================================

Only the nibbles move (GGML's ``j`` / ``j + 16`` pairs become ltjax's ``2j`` / ``2j + 1``) and the
f16 ``d`` / ``m`` are copied as they are, so ``ltjax.decompress`` of the result equals
``gguf.quants.dequantize`` of the block bytes exactly (both compute the product, and the sum,
in f32). Rows may be reordered on the way (``rows=``: llama.cpp permutes q/k rows for RoPE, an
output-channel permutation, so codes, scales and mins move together). Other GGML types (K-quants,
Q5_*) have no exact ltjax codec: `dequantize` them and choose a codec.

This module needs numpy only; reading a file is the caller's (the ``gguf`` package's
``GGUFReader``: a quantized ``ReaderTensor.data`` is the raw ``[rows, bytes]`` blocks).
"""

from __future__ import annotations

import numpy as np

from ltjax._format import CompressedTensor, pack

# GGML type ids (ggml.h / gguf.GGMLQuantizationType), so callers need not import gguf.
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
BLOCK = 32  # elements per Q4_0 / Q4_1 / Q8_0 block
BLOCK_BYTES = {Q4_0: 2 + 16, Q4_1: 2 + 2 + 16, Q8_0: 2 + 32}
TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", BF16: "BF16"}
Q8_0_MODES = ("exact", "int8")


def _blocks(raw: np.ndarray, qtype: int, cols: int) -> np.ndarray:
    """Raw bytes ``[rows, cols / 32 * block bytes]`` → ``[rows, cols / 32, block bytes]`` uint8."""
    name = TYPE_NAMES[qtype]
    if cols % BLOCK:
        raise ValueError(f"a {name} row holds whole blocks of {BLOCK}: {cols=} is not a multiple of {BLOCK}")
    raw = np.ascontiguousarray(np.asarray(raw).view(np.uint8))
    nb, bb = cols // BLOCK, BLOCK_BYTES[qtype]
    if raw.ndim != 2 or raw.shape[1] != nb * bb:
        raise ValueError(f"{name} data of shape {raw.shape} is not [rows, {nb} blocks x {bb} bytes] for {cols=}")
    return raw.reshape(raw.shape[0], nb, bb)


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per entry along the last axis → float16 (little-endian, as GGUF stores them)."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float16)[..., 0]


def q4_to_int4(raw: np.ndarray, qtype: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Q4_0 / Q4_1 blocks of ``[rows, cols]`` → ltjax int4 arrays ``(codes, scales, mins)``.

    ``codes`` uint8 ``[rows, cols / 2]`` (column ``2j`` in the low nibble), ``scales`` (the blocks'
    ``d``) and, for Q4_1, ``mins`` (their ``m``) float16 ``[rows, cols / 32]``; Q4_0's ``mins`` is None.
    """
    if qtype not in (Q4_0, Q4_1):
        raise ValueError(f"q4_to_int4 takes Q4_0 ({Q4_0}) or Q4_1 ({Q4_1}) blocks, not GGML type {qtype}")
    b = _blocks(raw, qtype, cols)
    rows, nb = b.shape[:2]
    scales = _f16(b[..., 0:2])
    mins = _f16(b[..., 2:4]) if qtype == Q4_1 else None
    qs = b[..., 4:] if qtype == Q4_1 else b[..., 2:]  # [rows, nb, 16]: byte j = element j | element j+16 << 4
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, cols)  # GGML element order
    codes = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)  # ltjax: element 2j low, 2j+1 high
    return codes, scales, mins


def q8_0_split(raw: np.ndarray, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 blocks of ``[rows, cols]`` → ``(q int8 [rows, cols], d float16 [rows, cols / 32])``."""
    b = _blocks(raw, Q8_0, cols)
    return np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(b.shape[0], cols), _f16(b[..., 0:2])


def q8_0_values(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``d * q`` in f32, as llama.cpp (and ``gguf.quants.dequantize``) computes it."""
    rows, cols = q.shape
    return (q.reshape(rows, -1, BLOCK).astype(np.float32) * d.astype(np.float32)[..., None]).reshape(rows, cols)


def dequantize(raw: np.ndarray, qtype: int, cols: int) -> np.ndarray:
    """f32 ``[rows, cols]`` of Q4_0 / Q4_1 / Q8_0 blocks (or F32 / F16 / BF16 values), llama.cpp's rule."""
    if qtype in (Q4_0, Q4_1):
        codes, s, m = q4_to_int4(raw, qtype, cols)
        q = np.stack([codes & 15, codes >> 4], axis=-1).reshape(codes.shape[0], -1, BLOCK).astype(np.float32)
        sf = s.astype(np.float32)[..., None]
        x = q * sf + m.astype(np.float32)[..., None] if qtype == Q4_1 else (q - np.float32(8)) * sf
        return x.reshape(codes.shape[0], cols)
    if qtype == Q8_0:
        return q8_0_values(*q8_0_split(raw, cols))
    return _plain(raw, qtype, cols)


def _plain(raw: np.ndarray, qtype: int, cols: int) -> np.ndarray:
    a = np.asarray(raw)
    if qtype == BF16:
        a = (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif qtype in (F32, F16):
        a = a.astype(np.float32)
    else:
        raise ValueError(f"GGML type {qtype} has no exact ltjax form here (only {sorted(TYPE_NAMES.values())})")
    return a.reshape(-1, cols)


def to_ltjax(
    raw: np.ndarray,
    qtype: int,
    cols: int,
    *,
    transpose: bool,
    rows: np.ndarray | None = None,
    q8_0: str = "exact",
    name: str = "tensor",
) -> tuple[CompressedTensor | np.ndarray, str]:
    """One GGML tensor ``[rows, cols]`` as an ltjax leaf, and a note saying how it was mapped.

    Args:
      raw: the tensor's data as GGUF holds it (``ReaderTensor.data``: raw blocks for quantized types).
      qtype: its GGML type id (``int(ReaderTensor.tensor_type)``).
      cols: elements per row (the GGUF's first dimension, ``ReaderTensor.shape[0]``).
      transpose: True for a Dense kernel: the leaf's logical shape is ``[cols, rows]`` (``[in, out]``)
        with its rows as output channels (``axis=1``), so ltjax's storage is the GGUF's ``[rows, cols]``
        and the groups run along the reduction axis. False (an embedding): logical ``[rows, cols]``, ``axis=0``.
      rows: an optional permutation of the rows (output channels), applied to every array.
      q8_0: ``"exact"``: a Q8_0 tensor becomes int8 only where that is exact (every block of every row
        shares its scale), otherwise its exact f32 values, uncompressed; ``"int8"``: otherwise ltjax int8
        of the exact values (one f32 scale per row: a second rounding, said in the note).
      name: for messages.

    Returns:
      ``(leaf, note)``: a `CompressedTensor`, or a float32 numpy array for what stays dense.
    """
    if q8_0 not in Q8_0_MODES:
        raise ValueError(f"{q8_0=} must be one of {Q8_0_MODES}")
    perm = (lambda a: a) if rows is None else (lambda a: None if a is None else np.ascontiguousarray(a[rows]))
    tname = TYPE_NAMES.get(qtype, f"GGML type {qtype}")
    axis = 1 if transpose else 0

    def logical(x2: np.ndarray) -> np.ndarray:
        return x2.T if transpose else x2

    def like(n_rows: int) -> np.ndarray:  # shape and dtype only, for the packer's header (no copy)
        return logical(np.broadcast_to(np.zeros((), np.float32), (n_rows, cols)))

    if qtype in (Q4_0, Q4_1):
        codes, scales, mins = (perm(a) for a in q4_to_int4(raw, qtype, cols))
        ct = pack(like(codes.shape[0]), "int4", axis=axis, name=name, group=BLOCK, asymmetric=qtype == Q4_1,
                  int4=(codes, scales, mins))
        return ct, f"{tname} blocks as int4 (group {BLOCK}, {'asymmetric' if qtype == Q4_1 else 'symmetric'}), exact"
    if qtype == Q8_0:
        q, d = (perm(a) for a in q8_0_split(raw, cols))
        if (d == d[:, :1]).all() and np.isfinite(d).all():  # then d * q per row is ltjax's int8, exactly
            ct = _with_int8(pack(like(q.shape[0]), "int8", axis=axis, name=name), q, d[:, 0].astype(np.float32))
            return ct, "Q8_0 blocks as int8: every row's blocks share their scale, exact"
        x = q8_0_values(q, d)
        if q8_0 == "exact":
            return np.ascontiguousarray(logical(x)), (
                "Q8_0 kept as its exact f32 values, uncompressed: its scales vary along rows (one per 32-block) "
                "and ltjax's int8 has one scale per row")
        ct = pack(logical(x), "int8", axis=axis, name=name)
        return ct, "Q8_0 requantised to int8 with one scale per row (a second rounding: q8_0='int8')"
    x = perm(_plain(raw, qtype, cols))
    return np.ascontiguousarray(logical(x)), f"{tname} values, uncompressed"


def _with_int8(ct: CompressedTensor, codes: np.ndarray, scales: np.ndarray) -> CompressedTensor:
    """``ct``'s header (int8) with ``codes`` and ``scales`` as its arrays, checksums computed."""
    from ltjax._format import tile_checksums  # pylint: disable=import-outside-toplevel

    arrays = {"codes": np.ascontiguousarray(codes, np.int8), "scales": np.ascontiguousarray(scales, np.float32)}
    arrays["checksums"] = tile_checksums(ct.header, arrays)
    out = CompressedTensor(header=ct.header, **arrays)
    out.validate(checksums=True)
    return out
