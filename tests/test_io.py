"""Checksummed files: round trips, atomic writes, and every kind of damage."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ltjax
from ltjax import _io
from ltjax._format import pack


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((96, 80)).astype(np.float32)
    s = w.copy()
    s[rng.random(s.shape) < 0.7] = 0
    return {
        "dense": {"kernel": pack(w, "int8", tile=(32, 64)), "bias": rng.standard_normal(80).astype(np.float32)},
        "sparse": [pack(s, "bitmask", tile=(32, 32)), pack(s.astype(np.float16), "bitmask_int8"), None],
        "raw": pack(rng.standard_normal((5, 7)).astype(np.float32), "raw"),
        "step": 3,
        "pair": (rng.standard_normal(3).astype(np.float32), 1.5),
    }


def _same(a, b):
    fa, ta = jax.tree_util.tree_flatten(a)
    fb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip(tmp_path):
    tree = _tree()
    p = tmp_path / "m.lt"
    ltjax.save(p, tree)
    back = ltjax.load(p)
    _same(back, tree)
    assert isinstance(back["dense"]["kernel"], ltjax.CompressedTensor)
    assert back["dense"]["kernel"].header == tree["dense"]["kernel"].header
    assert isinstance(back["dense"]["bias"], jax.Array)
    assert back["step"] == 3 and isinstance(back["pair"], tuple)
    np.testing.assert_array_equal(np.asarray(ltjax.decompress(back["sparse"][0])),
                                  np.asarray(ltjax.decompress(tree["sparse"][0])))
    host = ltjax.load(p, as_numpy=True)
    assert isinstance(host["dense"]["bias"], np.ndarray)
    s = ltjax.verify(p)
    assert s["ok"] and s["compressed"] == 4 and s["tiles"] > 4


def test_file_is_plain_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    p = tmp_path / "m.lt"
    tree = _tree()
    ltjax.save(p, tree)
    arrays = safetensors.load_file(str(p))
    np.testing.assert_array_equal(arrays["dense/kernel::codes"], np.asarray(tree["dense"]["kernel"].codes))


def test_every_flipped_byte_is_caught(tmp_path):
    w = np.random.default_rng(1).standard_normal((40, 64)).astype(np.float32)
    tree = {"w": pack(w, "bitmask_int8", tile=(16, 32)), "b": np.arange(5, dtype=np.float32)}
    p = tmp_path / "m.lt"
    ltjax.save(p, tree)
    buf = p.read_bytes()
    q = tmp_path / "bad.lt"
    for i in range(len(buf)):
        b = bytearray(buf)
        b[i] ^= 1 << (i % 8)
        q.write_bytes(bytes(b))
        with pytest.raises(ltjax.LTFormatError):
            ltjax.load(q, as_numpy=True)


def test_checksum_error_names_tensor_and_tile(tmp_path):
    w = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    tree = {"layer": {"kernel": pack(w, "int8", tile=(32, 32))}}
    p = tmp_path / "m.lt"
    ltjax.save(p, tree)
    arrays, _, header = _io.read_safetensors(p)
    meta = json.loads(header)
    lo, _ = meta["layer/kernel::codes"]["data_offsets"]
    buf = bytearray(p.read_bytes())
    # storage is [N=64, K=64] in 32x32 tiles; byte (row 40, col 5) is in tile row 1, col 0 → tile 2
    buf[8 + len(header) + lo + 40 * 64 + 5] ^= 0x80
    p.write_bytes(bytes(buf))
    with pytest.raises(ltjax.ChecksumError) as e:
        ltjax.load(p)
    assert e.value.tensor == "layer/kernel" and e.value.tile == 2
    assert "layer/kernel" in str(e.value) and "tile 2" in str(e.value)


@pytest.mark.parametrize("cut", [0, 4, 9, 100, -1])
def test_truncated_file(tmp_path, cut):
    p = tmp_path / "m.lt"
    ltjax.save(p, _tree())
    buf = p.read_bytes()
    p.write_bytes(buf[:cut] if cut >= 0 else buf[:-1])
    with pytest.raises(ltjax.LTFormatError, match="truncated|too short|not an ltjax"):
        ltjax.load(p)


def test_not_an_ltjax_file(tmp_path):
    p = tmp_path / "x.lt"
    p.write_bytes(b"hello, this is not a tensor file at all")
    with pytest.raises(ltjax.LTFormatError, match="not an ltjax file"):
        ltjax.load(p)
    safetensors = pytest.importorskip("safetensors.numpy")
    safetensors.save_file({"a": np.ones(3, np.float32)}, str(p))
    with pytest.raises(ltjax.LTFormatError, match="without ltjax metadata"):
        ltjax.verify(p)


def test_newer_format_version(tmp_path, monkeypatch):
    p = tmp_path / "m.lt"
    real = _io._encode

    def future(tree, *args):
        meta, arrays = real(tree, *args)
        meta["version"] = ltjax.FORMAT_VERSION + 1
        return meta, arrays

    monkeypatch.setattr(_io, "_encode", future)
    ltjax.save(p, _tree())
    monkeypatch.undo()
    with pytest.raises(ltjax.LTFormatError, match="newer than this ltjax reads"):
        ltjax.load(p)


def test_header_from_newer_version_in_a_tensor(tmp_path, monkeypatch):
    p = tmp_path / "m.lt"
    real = _io._encode

    def future(tree, *args):
        meta, arrays = real(tree, *args)
        meta["leaves"][0]["header"]["version"] = 2
        return meta, arrays

    monkeypatch.setattr(_io, "_encode", future)
    ltjax.save(p, {"w": pack(np.ones((4, 4), np.float32), "int8")})
    monkeypatch.undo()
    with pytest.raises(ltjax.LTFormatError, match="newer"):
        ltjax.load(p)


def test_save_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "m.lt"
    ltjax.save(p, _tree(0))
    before = p.read_bytes()
    # an error while writing: the old file stays, no temp file is left behind
    real_fsync = os.fsync

    def boom(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        ltjax.save(p, _tree(1))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.lt"]
    # a tree that cannot be stored fails before anything is written
    with pytest.raises(ValueError, match="cannot store a leaf of type object"):
        ltjax.save(p, {"a": object()})
    with pytest.raises(ValueError, match="string dict keys"):
        ltjax.save(p, {1: np.ones(2, np.float32)})
    assert p.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["m.lt"]


def test_bad_structure_errors(tmp_path):
    p = tmp_path / "m.lt"
    ltjax.save(p, _tree())
    buf = p.read_bytes()
    (n,) = struct.unpack("<Q", buf[:8])
    p.write_bytes(struct.pack("<Q", n + 10**6) + buf[8:])
    with pytest.raises(ltjax.LTFormatError):
        ltjax.load(p)
    p.write_bytes(buf + b"\0\0\0\0")
    with pytest.raises(ltjax.LTFormatError, match="unexpected bytes"):
        ltjax.load(p)


def test_load_to_device(tmp_path):
    p = tmp_path / "m.lt"
    ltjax.save(p, _tree())
    back = ltjax.load(p, device=jax.devices()[0])
    assert back["dense"]["kernel"].codes.devices() == {jax.devices()[0]}
    y = jax.jit(ltjax.decompress)(back["dense"]["kernel"])
    assert y.shape == (96, 80) and bool(jnp.all(jnp.isfinite(y)))


def test_stacked_tensors_round_trip(tmp_path):
    """A stack of same-layout tensors (the nn.scan convention): arrays carry the leading axis."""
    rng = np.random.default_rng(11)
    layers = [rng.standard_normal((64, 48)).astype(np.float32) for _ in range(3)]
    cts = [pack(w, "int8", tile=(16, 32)) for w in layers]
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *cts)
    assert stacked.stack_shape == (3,)
    assert stacked.dense_nbytes == 3 * cts[0].dense_nbytes
    assert stacked.ratio == pytest.approx(cts[0].ratio)
    np.testing.assert_array_equal(np.asarray(ltjax.decompress(stacked)),
                                  np.stack([np.asarray(ltjax.decompress(c)) for c in cts]))
    p = tmp_path / "s.lt"
    ltjax.save(p, {"scan": {"kernel": stacked}})
    back = ltjax.load(p)["scan"]["kernel"]
    assert back.stack_shape == (3,) and back.header == stacked.header
    _same(back, stacked)
    # damage in layer 2 is pinned to that layer
    arrays, _, header = _io.read_safetensors(p)
    lo, _ = json.loads(header)["scan/kernel::codes"]["data_offsets"]
    buf = bytearray(p.read_bytes())
    buf[8 + len(header) + lo + 2 * 64 * 48 + 7] ^= 1
    p.write_bytes(bytes(buf))
    with pytest.raises(ltjax.ChecksumError, match=r"scan/kernel\[2\]"):
        ltjax.load(p)


def test_load_validates_what_the_checksums_cannot(tmp_path, monkeypatch):
    """A file whose CRCs match bytes the format forbids (written by another tool) is refused by name."""
    rng = np.random.default_rng(31)
    w = rng.standard_normal((100, 64)).astype(np.float32)  # storage [64, 100]: rows of 100 columns
    w[rng.random(w.shape) < 0.5] = 0
    ct = pack(w, "bitmask_int8", tile=(32, 100))
    scales = np.array(ct.scales)
    scales[17] = np.nan
    mask = np.array(ct.mask)
    mask[3, -1] |= np.uint32(1 << 31)  # column 127 of a 100-column row
    for bad, what in (({"scales": scales}, r"scales\[17\] = nan is not finite"),
                      ({"mask": mask}, r"mask row 3 has bits set beyond its 100 columns")):
        damaged = ltjax.CompressedTensor(header=ct.header, **{**ct.arrays(), **bad})
        with pytest.raises(ltjax.LTFormatError, match=what):
            ltjax.save(tmp_path / "refused.lt", {"w": damaged})
        assert not (tmp_path / "refused.lt").exists()
        with monkeypatch.context() as m:  # write it anyway, as a foreign writer would (fresh CRCs)
            m.setattr(ltjax.CompressedTensor, "validate", lambda self, **kw: None)
            ltjax.save(tmp_path / "m.lt", {"layer": {"w": damaged}})
        for read in (ltjax.load, ltjax.verify):
            with pytest.raises(ltjax.LTFormatError, match=rf"tensor 'layer/w'.*{what}"):
                read(tmp_path / "m.lt")
