"""The int4 codec in the format: packing, decoding, checks, files, stacks, shards, the XLA path.

The reference is written here in plain numpy from the rule in docs/int4.md (llama.cpp's Q4_0 and
Q4_1 blocks): every nibble unpacked by hand, ``(q - 8) * s`` or ``q * s + m`` in float32.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ltjax
from ltjax._format import Header, int4_quantize, pack, tile_checksums, verify_checksums

RNG = np.random.default_rng(20261207)


def _decode_numpy(codes, scales, mins, group):
    c, half = codes.shape
    q = np.empty((c, half * 2), np.float32)
    q[:, 0::2] = codes & 15
    q[:, 1::2] = codes >> 4
    s = np.repeat(scales.astype(np.float32), group, axis=1)
    return q * s + np.repeat(mins.astype(np.float32), group, axis=1) if mins is not None else (q - 8) * s


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_pack_decodes_as_the_rule_says(group, asymmetric):
    w = RNG.standard_normal((384, 96)).astype(np.float32)  # a Dense kernel [K, N]: storage [N, K]
    ct = ltjax.compress(w, "int4", group=group, asymmetric=asymmetric)
    assert ct.codes.shape == (96, 192) and ct.codes.dtype == np.uint8 and ct.scales.shape == (96, 384 // group)
    assert (ct.mins is not None) == asymmetric
    want = _decode_numpy(np.asarray(ct.codes), np.asarray(ct.scales), None if ct.mins is None else np.asarray(ct.mins),
                         group).T
    for impl in ("reference", "xla"):
        np.testing.assert_array_equal(np.asarray(ltjax.decompress(ct, impl=impl)), want)
    # round to nearest: within half a step of the grid (asymmetric), or one step (symmetric: the side
    # opposite the group's largest magnitude reaches +7 steps, not +8)
    err = np.abs(want - w).max()
    assert err <= (0.5 if asymmetric else 1.0) * np.abs(np.asarray(ct.scales, np.float32)).max() * 1.01 + 1e-3
    bits = ct.nbytes * 8 / w.size
    assert abs(bits - (4 + (32 if asymmetric else 16) / group)) < 0.01
    ct.validate(checksums=True)


def test_symmetric_maps_the_largest_magnitude_to_code_zero():
    """llama.cpp's Q4_0 rule: s = x_max / -8, so the largest-magnitude value decodes exactly."""
    w = RNG.standard_normal((1, 64)).astype(np.float32)
    codes, scales, _ = int4_quantize(w, 64, False)
    i = int(np.abs(w).argmax())
    q = int((codes[0, i // 2] >> (4 * (i % 2))) & 15)
    assert q == 0 and np.isclose((q - 8) * np.float32(scales[0, 0]), w[0, i], rtol=1e-3)


def test_bad_groups_and_scales_are_refused_by_name():
    with pytest.raises(ValueError, match="multiple of group=64"):
        ltjax.compress(RNG.standard_normal((100, 8)).astype(np.float32), "int4")
    with pytest.raises(ValueError, match=r"group=48 is not one of \(32, 64, 128\)"):
        ltjax.compress(RNG.standard_normal((96, 8)).astype(np.float32), "int4", group=48)
    with pytest.raises(ValueError, match="tile columns"):
        pack(RNG.standard_normal((256, 8)).astype(np.float32), "int4", group=64, tile=(8, 96))
    with pytest.raises(ValueError, match="float16"):
        ltjax.compress((RNG.standard_normal((64, 4)) * 1e-7).astype(np.float32), "int4")
    with pytest.raises(ValueError, match="apply to codec 'int4'"):
        pack(RNG.standard_normal((64, 4)).astype(np.float32), "int8", group=64)
    with pytest.raises(ValueError, match="non-finite"):
        ltjax.compress(np.full((64, 4), np.nan, np.float32), "int4")


def test_checksums_pin_a_flipped_code_scale_or_min():
    ct = pack(RNG.standard_normal((512, 64)).astype(np.float32), "int4", group=32, asymmetric=True, tile=(16, 128))
    assert ct.header.num_tiles == 4 * 4
    for field in ("codes", "scales", "mins"):
        arr = np.array(getattr(ct, field))
        arr.reshape(-1).view(np.uint8)[arr.nbytes // 3] ^= 0x10
        bad = ltjax.CompressedTensor(header=ct.header, **{**ct.arrays(), field: arr})
        with pytest.raises(ltjax.ChecksumError, match="tile"):
            verify_checksums(bad, name="w")
        got = tile_checksums(ct.header, {k: np.asarray(v) for k, v in bad.arrays().items()})
        assert int((got != np.asarray(ct.checksums)).sum()) == 1, field
    mins = np.array(ct.mins)
    mins[3, 1] = np.inf
    with pytest.raises(ltjax.LTFormatError, match=r"mins\[3, 1\] = inf is not finite"):
        ltjax.CompressedTensor(header=ct.header, **{**ct.arrays(), "mins": mins}).validate()


def test_files_stacks_and_shards(tmp_path):
    w = RNG.standard_normal((3, 256, 128)).astype(np.float32)
    tree = ltjax.nn.compress_params({"blocks": {"kernel": w}, "head": {"kernel": w[0]}},
                                    ltjax.Policy(codec="int4", group=128, asymmetric=True), stacked="blocks/*")
    st = tree["blocks"]["kernel"]
    assert st.codec == "int4" and st.stack_shape == (3,) and st.header.group == 128
    ltjax.save(tmp_path / "m.lt", tree)
    back = ltjax.load(tmp_path / "m.lt")
    ltjax.verify(tmp_path / "m.lt")
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back["blocks"]["kernel"].header == st.header
    # the header's JSON: int4 carries its groups; the other codecs' headers are as they always were
    assert json.loads(json.dumps(st.header.to_json()))["group"] == 128
    assert "group" not in ltjax.compress(w[0], "int8").header.to_json()
    assert Header.from_json(st.header.to_json()) == st.header
    x = jnp.asarray(RNG.standard_normal((2, 256)).astype(np.float32))
    ys = jax.vmap(lambda c: ltjax.matmul(x, c))(st)
    np.testing.assert_allclose(ys, jax.vmap(lambda c: ltjax.matmul_reference(x, c))(st), rtol=1e-5, atol=1e-4)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    head = tree["head"]["kernel"]
    sh = ltjax.shard(head, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model")))
    np.testing.assert_array_equal(np.asarray(ltjax.decompress(sh)), np.asarray(ltjax.decompress(head)))


@pytest.mark.parametrize("asymmetric", [False, True])
def test_matmul_and_gradients_through_the_public_vjp(asymmetric):
    w = RNG.standard_normal((192, 80)).astype(np.float32)
    ct = ltjax.compress(w, "int4", group=32, asymmetric=asymmetric)
    for m in (1, 7, 33):
        x = jnp.asarray(RNG.standard_normal((m, 192)).astype(np.float32))
        for impl in (None, "xla"):
            np.testing.assert_allclose(jax.jit(lambda x, c: ltjax.matmul(x, c, impl=impl))(x, ct),
                                       ltjax.matmul_reference(x, ct), rtol=1e-5, atol=1e-4)

        def loss(f):
            return lambda x, c: jnp.sum(jnp.sin(f(x, c)))

        g = jax.jit(jax.grad(loss(ltjax.matmul), argnums=(0, 1), allow_int=True))(x, ct)
        r = jax.grad(loss(ltjax.matmul_reference), argnums=(0, 1), allow_int=True)(x, ct)
        np.testing.assert_allclose(g[0], r[0], rtol=1e-4, atol=1e-4)
        for f in ("scales", "mins") if asymmetric else ("scales",):
            a, b = np.asarray(getattr(g[1], f), np.float32), np.asarray(getattr(r[1], f), np.float32)
            np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * np.abs(b).max())  # float16 cotangents
        assert g[1].codes.dtype == jax.dtypes.float0


def test_compress_tree_leaves_what_int4_cannot_hold_dense_with_the_reason():
    tree = {"ok": {"kernel": RNG.standard_normal((576, 192)).astype(np.float32)},
            "odd": {"kernel": RNG.standard_normal((100, 64)).astype(np.float32)}}
    out, rep = ltjax.compress_tree(tree, ltjax.Policy(codec="int4"), return_report=True)
    by = {r.path: r for r in rep.leaves}
    assert by["ok/kernel"].codec == "int4" and 0.05 < by["ok/kernel"].rel_error < 0.15
    assert by["odd/kernel"].codec == "dense" and "multiple of group=64" in by["odd/kernel"].reason
    assert not isinstance(out["odd"]["kernel"], ltjax.CompressedTensor)


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("m", [1, 8, 64])
def test_xla_path_holds_no_decoded_weight(asymmetric, m):
    """The XLA path's compiled temp memory stays below one dense layer for a chain of int4 layers
    (a decode of the weight alone is work XLA hoists and materialises for every layer at once)."""
    from ltjax._format import choose_tile

    k = n = 2048
    h = Header(codec="int4", shape=(k, n), dtype="float32", axis=1, tile=choose_tile((n, k), None), group=64,
               asymmetric=asymmetric)
    sds = jax.ShapeDtypeStruct
    arrays = dict(codes=sds((n, k // 2), jnp.uint8), scales=sds((n, k // 64), jnp.float16),
                  checksums=sds((h.num_tiles,), jnp.uint32))
    if asymmetric:
        arrays["mins"] = jax.ShapeDtypeStruct((n, k // 64), jnp.float16)
    cts = [ltjax.CompressedTensor(header=h, **arrays) for _ in range(6)]

    def f(x, cts):
        for ct in cts:
            x = jnp.tanh(ltjax.matmul(x, ct, impl="xla"))
        return jnp.sum(x)

    x = jax.ShapeDtypeStruct((m, k), jnp.float32)
    for fn in (f, jax.grad(f)):
        temp = jax.jit(fn).lower(x, cts).compile().memory_analysis().temp_size_in_bytes
        assert temp < k * n * 4, f"compiled temp {temp / 2**20:.1f} MiB holds a decoded layer"


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_embedding_lookup_decodes_only_the_gathered_rows(axis, asymmetric):
    import flax.linen as nn

    table = RNG.standard_normal((512, 128)).astype(np.float32)
    ct = ltjax.compress(table, "int4", axis=axis, group=64 if axis == 0 else 128, asymmetric=asymmetric)
    ids = jnp.asarray(RNG.integers(0, 512, (3, 5)))
    emb = nn.Embed(512, 128)
    params = {"params": {"embedding": ct}}
    with ltjax.nn.intercept():
        got = jax.jit(emb.apply)(params, ids)
        temp = jax.jit(emb.apply).lower(params, ids).compile().memory_analysis().temp_size_in_bytes
    np.testing.assert_array_equal(got, jnp.take(ltjax.decompress_reference(ct), ids, axis=0))
    assert temp < table.nbytes / 4  # no decoded table
