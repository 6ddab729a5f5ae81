"""Running the unmodified `models.llama` model on ltjax-compressed params, for benchmarks.

The model runs inside ``ltjax.nn.intercept()``: its ``nn.Dense`` and ``nn.Embed`` (lookup and
``attend``) compute through the public ``ltjax.matmul`` / row-gather decode.
"""

from __future__ import annotations

import math

import jax
import numpy as np

import ltjax
from ltjax._format import CompressedTensor, Header, choose_tile, expected_arrays, normalize_axis
from ltjax.nn import intercept  # noqa: F401  (re-exported for the benchmarks)

INTERCEPT = "ltjax.nn.intercept"


POLICY = ltjax.Policy(codec="int8", min_size=4096)


def abstract_compressed(leaf: jax.ShapeDtypeStruct, codec: str, *, axis="default") -> CompressedTensor:
    """A `CompressedTensor` of ``codec`` with `jax.ShapeDtypeStruct` leaves: no data, no packing."""
    if codec not in ("raw", "int8"):
        raise ValueError(f"{codec=}: abstract tensors need a codec whose sizes do not depend on the data")
    shape = tuple(int(s) for s in leaf.shape)
    ax = normalize_axis(shape, axis)
    c = 1 if ax is None else shape[ax]
    header = Header(codec=codec, shape=shape, dtype=np.dtype(leaf.dtype).name, axis=ax,
                    tile=choose_tile((c, math.prod(shape) // c), None))
    arrays = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in expected_arrays(header, None).items()}
    return CompressedTensor(header=header, **arrays)


def abstract_compress_tree(shapes, codec: str = "int8", policy: ltjax.Policy = POLICY):
    """`compress_tree` on a tree of `ShapeDtypeStruct`s: the leaves ``policy`` would select
    (by size, rank and skip pattern; channel axis from ``policy.axes``) become abstract
    `CompressedTensor`s of ``codec``."""
    import fnmatch

    from ltjax._analyze import path_str

    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for path, leaf in flat:
        p = path_str(path)
        keep = (math.prod(leaf.shape) < policy.min_size or len(leaf.shape) < policy.min_ndim
                or any(fnmatch.fnmatchcase(p, s) for s in policy.skip))
        out.append(leaf if keep else abstract_compressed(leaf, codec, axis=policy.axis_for(p)))
    return jax.tree_util.tree_unflatten(treedef, out)


def decompressed(tree):
    """Every `CompressedTensor` of ``tree`` decoded back to a dense array (numerically the
    same weights the compressed model computes with)."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(ltjax.decompress(x)) if isinstance(x, CompressedTensor) else x, tree,
        is_leaf=lambda x: isinstance(x, CompressedTensor))
