"""A Llama-architecture decoder in plain flax.linen, with a functional KV cache.

The model imports nothing from ltjax on purpose: every projection is a plain
``nn.Dense(use_bias=False)`` and the embedding a plain ``nn.Embed`` (the tied LM
head uses ``embed.attend``), so ltjax can swap them for compressed layers from
the outside with ``nn.intercept_methods`` without this file changing.

RoPE convention: Hugging Face ``rotate_half`` (the two halves of each head are
the real and imaginary parts). GGUF checkpoints store q/k rows permuted for
llama.cpp's interleaved RoPE; ``models.loaders`` undoes that permutation.

Parameter tree (flax Dense kernels are ``[in, out]``)::

    params["embed"]["embedding"]                      [vocab, dim]
    params["layers_0"]["attn_norm"]["scale"]          [dim]
    params["layers_0"]["attn"]["q_proj"]["kernel"]    [dim, n_heads * head_dim]
    params["layers_0"]["attn"]["k_proj"]["kernel"]    [dim, n_kv_heads * head_dim]
    params["layers_0"]["attn"]["v_proj"]["kernel"]    [dim, n_kv_heads * head_dim]
    params["layers_0"]["attn"]["o_proj"]["kernel"]    [n_heads * head_dim, dim]
    params["layers_0"]["mlp_norm"]["scale"]           [dim]
    params["layers_0"]["mlp"]["gate_proj"]["kernel"]  [dim, ffn_dim]
    params["layers_0"]["mlp"]["up_proj"]["kernel"]    [dim, ffn_dim]
    params["layers_0"]["mlp"]["down_proj"]["kernel"]  [ffn_dim, dim]
    params["norm"]["scale"]                           [dim]
    params["lm_head"]["kernel"]                       [dim, vocab]  (untied only)

KV cache: a tuple with one dict per layer. Dense: ``{"k", "v"}`` of shape
``[batch, max_len, n_kv_heads, head_dim]``. Int8: ``{"k", "v"}`` int8 of the same
shape plus ``{"k_scale", "v_scale"}`` ``[batch, max_len, n_kv_heads]`` (bfloat16 by
default, float32 on request), with ``dense ≈ codes * scale[..., None]`` (symmetric, one
scale per token per head). The codes are computed with the scale as stored, so the error
stays within half a step (scale / 2) per element; rounding the scale to bf16 changes the
step by at most 0.4%. A bf16 scale makes the cache 1.03 bytes per element (1.94x smaller
than bf16) instead of 1.06 with f32 scales (1.88x).
The cache kind is read from the dtype of ``k``; the model has no cache option.

Attention over a cache longer than `ATTEND_FULL_MAX` positions (and a multiple of
`ATTEND_BLOCK`) reads only the blocks up to the newest written position: a loop over
`ATTEND_BLOCK`-position blocks with a running softmax (max, sum, weighted values), its trip
count ``ceil((start_pos + t) / ATTEND_BLOCK)`` read at run time. A decode step's attention then
costs what the position needs, not what ``max_len`` reserves (a 2048-slot f32 cache is ~94 MB
over SmolLM2's 30 layers, read in full by every step before). Shorter caches attend to every
slot at once (one loop step would cost more than it saves).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

KV_CACHE_KINDS = ("dense", "int8")
ATTEND_BLOCK = 128  # cache positions per step of the bounded attention
ATTEND_FULL_MAX = 256  # caches up to this length are attended in one piece


@dataclasses.dataclass(frozen=True, slots=True)
class LlamaConfig:
    """Shape and numerics of a Llama-architecture model.

    Frozen and slotted, so it is hashable and can be a static jit argument.

    Attributes:
      vocab: Vocabulary size.
      dim: Model (residual stream) width.
      n_layers: Number of transformer blocks.
      n_heads: Number of query heads.
      n_kv_heads: Number of key/value heads (grouped-query attention); divides
        ``n_heads``.
      head_dim: Width of one attention head (even, for RoPE).
      ffn_dim: Hidden width of the SwiGLU MLP.
      rope_theta: RoPE base frequency.
      norm_eps: RMSNorm epsilon.
      tie_embeddings: If True the LM head is the transposed embedding.
      max_seq_len: Longest sequence the model was trained for (the default KV
        cache length).
    """

    vocab: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048

    def __post_init__(self):
        for name in ("vocab", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"LlamaConfig.{name}={value!r} must be a positive int")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
    """Returns (cos, sin) of shape ``positions.shape + (head_dim // 2,)``."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x[b, t, h, d]`` with HF ``rotate_half`` RoPE; cos/sin are ``[b, t, d/2]``."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def quantize_kv(x: jax.Array, scale_dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per ``x[..., :]`` row: returns (codes int8, scale ``scale_dtype[...]``).

    The scale ``amax / 127`` is rounded to ``scale_dtype`` first and the codes are computed
    with that stored scale, so ``|x - codes * scale| <= scale / 2`` holds for the stored
    scale (a rounded-down scale can push ``amax / scale`` to at most 127.25, which the clip
    to 127 absorbs within the same bound).
    """
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    # Floored at the smallest normal number of scale_dtype: a scale that underflows (to a
    # subnormal or to 0 in float16) would lose its precision or divide by zero.
    scale = jnp.maximum(jnp.where(amax > 0, amax / 127.0, 1.0), jnp.finfo(scale_dtype).tiny).astype(scale_dtype)
    codes = jnp.clip(jnp.round(x / scale.astype(jnp.float32)[..., None]), -127, 127).astype(jnp.int8)
    return codes, scale


def dequantize_kv(codes: jax.Array, scale: jax.Array) -> jax.Array:
    """Inverse of `quantize_kv`: ``codes * scale[..., None]`` in float32."""
    return codes.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]


def init_cache(
    config: LlamaConfig,
    batch: int,
    max_len: int | None = None,
    *,
    kind: str = "dense",
    dtype=jnp.float32,
    scale_dtype=jnp.bfloat16,
) -> tuple[dict[str, jax.Array], ...]:
    """Allocates an empty KV cache (see the module docstring for its layout).

    Args:
      config: Model config.
      batch: Batch size.
      max_len: Cache length in tokens; defaults to ``config.max_seq_len``.
      kind: ``"dense"`` (``dtype`` keys and values) or ``"int8"``.
      dtype: Element type of a dense cache.
      scale_dtype: Element type of an int8 cache's per-token, per-head scales.

    Returns:
      A tuple of ``config.n_layers`` dicts of zero arrays.
    """
    if kind not in KV_CACHE_KINDS:
        raise ValueError(f"{kind=} must be one of {KV_CACHE_KINDS}")
    max_len = config.max_seq_len if max_len is None else max_len
    if max_len <= 0 or batch <= 0:
        raise ValueError(f"{batch=} and {max_len=} must be positive")
    shape = (batch, max_len, config.n_kv_heads, config.head_dim)
    if kind == "dense":
        layer = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    else:
        layer = lambda: {
            "k": jnp.zeros(shape, jnp.int8),
            "v": jnp.zeros(shape, jnp.int8),
            "k_scale": jnp.ones(shape[:-1], scale_dtype),
            "v_scale": jnp.ones(shape[:-1], scale_dtype),
        }
    return tuple(layer() for _ in range(config.n_layers))


def cache_nbytes(cache) -> int:
    """Bytes held by a KV cache (all leaves, scales included)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(cache))


def cache_kind(layer_cache: dict[str, jax.Array]) -> str:
    """``"int8"`` or ``"dense"``, read from the dtype of the cached keys."""
    return "int8" if layer_cache["k"].dtype == jnp.int8 else "dense"


def _write_cache(layer_cache, k, v, start_pos):
    """Writes k, v ``[b, t, hkv, d]`` at ``start_pos``; returns the new cache."""
    update = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new, start_pos, axis=1)
    if cache_kind(layer_cache) == "int8":
        kq, ks = quantize_kv(k, layer_cache["k_scale"].dtype)
        vq, vs = quantize_kv(v, layer_cache["v_scale"].dtype)
        return {
            "k": update(layer_cache["k"], kq),
            "v": update(layer_cache["v"], vq),
            "k_scale": update(layer_cache["k_scale"], ks),
            "v_scale": update(layer_cache["v_scale"], vs),
        }
    dtype = layer_cache["k"].dtype
    return {"k": update(layer_cache["k"], k.astype(dtype)), "v": update(layer_cache["v"], v.astype(dtype))}


def _cache_slots(layer_cache, start=0, size=None):
    """Dense f32 keys and values of cache slots ``[start, start + size)`` (all by default): int8
    codes are dequantised here, inside the attention computation, where XLA fuses them."""
    size = layer_cache["k"].shape[1] if size is None else size
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)
    if cache_kind(layer_cache) == "int8":
        return (dequantize_kv(sl(layer_cache["k"]), sl(layer_cache["k_scale"])),
                dequantize_kv(sl(layer_cache["v"]), sl(layer_cache["v_scale"])))
    return sl(layer_cache["k"]).astype(jnp.float32), sl(layer_cache["v"]).astype(jnp.float32)


def _attend_bounded(qg, layer_cache, positions, end):
    """Causal attention of ``qg [b, t, hkv, g, d]`` (f32, scaled) over cache slots ``[0, end)``,
    `ATTEND_BLOCK` slots a step with a running softmax: ``[b, t, hkv, g, d]`` f32."""
    b, t, hkv, g, d = qg.shape
    blk = ATTEND_BLOCK

    def step(i, carry):
        m, l, acc = carry
        kb, vb = _cache_slots(layer_cache, i * blk, blk)
        s = jnp.einsum("btkgd,bskd->bkgts", qg, kb)
        kpos = i * blk + jnp.arange(blk)
        s = jnp.where((kpos[None, None, :] <= positions[:, :, None])[:, None, None], s, jnp.finfo(jnp.float32).min)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        return m_new, l * corr + p.sum(axis=-1), acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p, vb)

    init = (jnp.full((b, hkv, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, t), jnp.float32),
            jnp.zeros((b, hkv, g, t, d), jnp.float32))
    # Slot 0 is in block 0 and before every query: each row's max is finite after the first step.
    _, l, acc = jax.lax.fori_loop(0, (end + blk - 1) // blk, step, init)
    return jnp.transpose(acc / l[..., None], (0, 3, 1, 2, 4))


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned ``scale``, computed in float32."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE and an optional KV cache."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, layer_cache=None, start_pos=0):
        c = self.config
        b, t, _ = x.shape
        dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)
        q = dense(c.n_heads * c.head_dim, "q_proj")(x).reshape(b, t, c.n_heads, c.head_dim)
        k = dense(c.n_kv_heads * c.head_dim, "k_proj")(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        v = dense(c.n_kv_heads * c.head_dim, "v_proj")(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        group = c.n_heads // c.n_kv_heads
        qg = q.reshape(b, t, c.n_kv_heads, group, c.head_dim).astype(jnp.float32)
        new_cache = None if layer_cache is None else _write_cache(layer_cache, k, v, start_pos)
        slots = None if new_cache is None else new_cache["k"].shape[1]
        if slots is not None and slots > ATTEND_FULL_MAX and slots % ATTEND_BLOCK == 0:
            qs = qg / np.sqrt(c.head_dim).astype(np.float32)
            out = _attend_bounded(qs, new_cache, positions, start_pos + t)
        else:
            if new_cache is None:
                keys, values, key_pos = k.astype(jnp.float32), v.astype(jnp.float32), positions
            else:
                keys, values = _cache_slots(new_cache)
                key_pos = jnp.broadcast_to(jnp.arange(slots), (b, slots))
            # Causal mask; with a cache it is also the length mask (slots past the
            # newest written position have key_pos > every query position).
            mask = key_pos[:, None, :] <= positions[:, :, None]  # (b, t, s)
            scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys)
            scores = scores / np.sqrt(c.head_dim).astype(np.float32)
            scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1)
            out = jnp.einsum("bkgts,bskd->btkgd", probs, values)
        out = out.reshape(b, t, c.n_heads * c.head_dim).astype(x.dtype)
        return dense(c.dim, "o_proj")(out), new_cache


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = nn.Dense(c.ffn_dim, use_bias=False, name="gate_proj")(x)
        up = nn.Dense(c.ffn_dim, use_bias=False, name="up_proj")(x)
        return nn.Dense(c.dim, use_bias=False, name="down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: attention then MLP, each with a residual."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, layer_cache=None, start_pos=0):
        c = self.config
        with jax.named_scope("attn"):
            h, new_cache = Attention(c, name="attn")(
                RMSNorm(c.norm_eps, name="attn_norm")(x), positions, layer_cache, start_pos
            )
        x = x + h
        with jax.named_scope("mlp"):
            x = x + MLP(c, name="mlp")(RMSNorm(c.norm_eps, name="mlp_norm")(x))
        return x, new_cache


class Llama(nn.Module):
    """Llama-architecture causal LM.

    Call with ``tokens [batch, t]`` (int). Without a cache it runs plain causal
    attention over the ``t`` tokens and returns ``(logits, None)``. With a cache
    (from `init_cache`) it writes the new keys/values at ``start_pos`` (a traced
    int is fine), attends over the cache, and returns ``(logits, new_cache)``.

    Example:
      >>> cfg = LlamaConfig(vocab=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
      ...                   head_dim=8, ffn_dim=48)
      >>> model = Llama(cfg)
      >>> tokens = jnp.ones((1, 5), jnp.int32)
      >>> params = model.init(jax.random.key(0), tokens)["params"]
      >>> logits, _ = model.apply({"params": params}, tokens)
      >>> logits.shape
      (1, 5, 64)
    """

    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, cache=None, start_pos=0):
        c = self.config
        b, t = tokens.shape
        if cache is not None and len(cache) != c.n_layers:
            raise ValueError(f"cache has {len(cache)} layers, config.n_layers={c.n_layers}")
        positions = jnp.broadcast_to(start_pos + jnp.arange(t), (b, t))
        embed = nn.Embed(c.vocab, c.dim, name="embed")
        with jax.named_scope("llama.embed"):
            x = embed(tokens).astype(self.dtype)
        new_cache = []
        for i in range(c.n_layers):
            with jax.named_scope(f"llama.layers_{i}"):
                x, layer_cache = Block(c, name=f"layers_{i}")(
                    x, positions, None if cache is None else cache[i], start_pos
                )
            new_cache.append(layer_cache)
        x = RMSNorm(c.norm_eps, name="norm")(x)
        with jax.named_scope("llama.lm_head"):
            if c.tie_embeddings:
                logits = embed.attend(x)
            else:
                logits = nn.Dense(c.vocab, use_bias=False, name="lm_head")(x)
        return logits.astype(jnp.float32), (None if cache is None else tuple(new_cache))


def param_shapes(config: LlamaConfig) -> dict:
    """The expected parameter tree as ``jax.ShapeDtypeStruct`` leaves (no compute)."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda tk: Llama(config).init(jax.random.key(0), tk), tokens)["params"]


def init_params(config: LlamaConfig, seed: int = 0, scale: float = 0.02) -> dict:
    """Random parameters (normal, std ``scale``; norm scales near one), for tests and demos."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        if path[-1].key == "scale":
            out.append(1.0 + 0.1 * rng.standard_normal(leaf.shape).astype(np.float32))
        else:
            out.append(scale * rng.standard_normal(leaf.shape).astype(np.float32))
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in out])
