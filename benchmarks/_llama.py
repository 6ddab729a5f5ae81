"""Running the unmodified `models.llama` model on ltjax-compressed params, for benchmarks.

`intercept()` is ``ltjax.nn.intercept()`` where this ltjax build has it; otherwise a
minimal stand-in with the same contract for what the Llama model uses (``nn.Dense``
without bias, ``nn.Embed.__call__`` and ``nn.Embed.attend``): a compressed kernel computes
through the public ``ltjax.matmul`` / ``ltjax.decompress``. `INTERCEPT` names which one ran.
"""

from __future__ import annotations

import contextlib
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ltjax
from ltjax._format import CompressedTensor, Header, choose_tile, expected_arrays, normalize_axis


def _fallback_interceptor(next_fun, args, kwargs, context):
    m, name = context.module, context.method_name
    if isinstance(m, nn.Dense) and name == "__call__":
        kernel = m.variables.get("params", {}).get("kernel")
        if isinstance(kernel, CompressedTensor):
            y = ltjax.matmul(args[0], kernel)
            bias = m.variables["params"].get("bias")
            return y if bias is None else y + bias
    if isinstance(m, nn.Embed) and name in ("__call__", "attend"):
        table = m.variables.get("params", {}).get("embedding")
        if isinstance(table, CompressedTensor):
            if name == "__call__":
                return jnp.take(ltjax.decompress(table), args[0], axis=0)
            return ltjax.matmul(args[0], table.T)
    return next_fun(*args, **kwargs)


def _own_submodule(name: str) -> bool:
    """Whether ``ltjax.<name>`` exists in the ltjax package actually imported (an editable
    install's finder can otherwise resolve it from another checkout, against another format)."""
    here = os.path.dirname(ltjax.__file__)
    return os.path.exists(os.path.join(here, f"{name}.py")) or os.path.isdir(os.path.join(here, name))


_ltjax_intercept = None
INTERCEPT = "benchmarks._llama fallback interceptor (ltjax.nn.intercept not in this build)"
if _own_submodule("nn"):  # the real one, once ltjax.nn is merged
    try:
        from ltjax.nn import intercept as _ltjax_intercept  # type: ignore[attr-defined]

        INTERCEPT = "ltjax.nn.intercept"
    except ImportError:
        pass


@contextlib.contextmanager
def intercept():
    if _ltjax_intercept is not None:
        with _ltjax_intercept():
            yield
    else:
        with nn.intercept_methods(_fallback_interceptor):
            yield


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
