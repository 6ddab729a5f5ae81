"""Small unmodified Flax models the integration tests compress (no ltjax imports here)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nn.Module):
    hidden: int = 256
    out: int = 64

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.out)(x)


class Block(nn.Module):
    """Pre-norm transformer block: DenseGeneral attention + MLP (scan-compatible carry)."""

    heads: int = 4
    head_dim: int = 32
    mlp: int = 256

    @nn.compact
    def __call__(self, x, _):
        d = x.shape[-1]
        h = nn.LayerNorm()(x)
        q = nn.DenseGeneral((self.heads, self.head_dim), name="query")(h)
        k = nn.DenseGeneral((self.heads, self.head_dim), name="key")(h)
        v = nn.DenseGeneral((self.heads, self.head_dim), name="value")(h)
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim)
        mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v)
        x = x + nn.DenseGeneral(d, axis=(-2, -1), name="out")(o)
        h = nn.LayerNorm()(x)
        x = x + nn.Dense(d)(nn.gelu(nn.Dense(self.mlp)(h)))
        return x, None


class TinyLM(nn.Module):
    vocab: int = 512
    dim: int = 128
    layers: int = 2

    @nn.compact
    def __call__(self, ids):
        """Token ids, or already embedded floats (so input gradients exist)."""
        embed = nn.Embed(self.vocab, self.dim)
        x = embed(ids) if jnp.issubdtype(ids.dtype, jnp.integer) else ids
        block = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        x, _ = block(name="blocks")(x, None)
        x = nn.remat(Block, prevent_cse=False)(name="last")(x, None)[0]
        x = nn.LayerNorm()(x)
        return embed.attend(x) + nn.Dense(self.vocab, name="head")(x)


class NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, vocab=512, dim=128, hidden=256):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.attn_in = nnx.LinearGeneral(dim, (4, 32), rngs=rngs)
        self.attn_out = nnx.LinearGeneral((4, 32), dim, axis=(-2, -1), rngs=rngs)
        self.layers = nnx.List([nnx.Linear(dim, hidden, rngs=rngs), nnx.Linear(hidden, dim, rngs=rngs)])
        self.seq = nnx.Sequential(nnx.Linear(dim, hidden, rngs=rngs), nnx.relu, nnx.Linear(hidden, dim, rngs=rngs))
        self.norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.attn_out(self.attn_in(x))
        for layer in self.layers:
            x = nnx.relu(layer(x))
        x = x + self.seq(x)
        return self.embed.attend(self.norm(x))
