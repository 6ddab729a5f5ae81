"""Flax linen integration: compressed Dense / DenseGeneral / Embed and transparent `intercept()`.

Two ways in:

* Your own modules: `CompressedDense`, `CompressedDenseGeneral`, `CompressedEmbed` take the
  ``flax.linen`` signatures and create the same param trees as ``nn.Dense`` & co. (dense at
  init); after `ltjax.compress_tree` their kernels are `CompressedTensor`s and the modules
  compute with `ltjax.matmul`.
* Unmodified models: compress the params and apply the model inside ``with intercept():``;
  every ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Embed`` (and ``nn.Einsum``, by decompressing)
  whose kernel is compressed runs on it, also inside ``nn.remat`` and ``nn.scan``. Modules
  whose params are dense run unchanged.

>>> import jax, jax.numpy as jnp, flax.linen as nn, ltjax
>>> model = nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(64)])
>>> x = jax.random.normal(jax.random.key(0), (4, 128))
>>> params = model.init(jax.random.key(1), x)["params"]
>>> cparams = ltjax.compress_tree(params, ltjax.Policy(codec="int8"))
>>> with ltjax.nn.intercept():
...     y = jax.jit(model.apply)({"params": cparams}, x)
>>> bool(jnp.allclose(y, model.apply({"params": params}, x), atol=3e-2))
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype as _promote_dtype
from flax.linen.linear import default_embed_init, default_kernel_init
from jax import lax

from ltjax import _layers, _layout
from ltjax._activation_modules import CompressedReLU, SparseDense
from ltjax._activations import relu
from ltjax._analyze import (
    CompressionReport,
    LeafReport,
    Policy,
    _output_error,
    analyze_array,
    calibrated_int4,
    compress_planned,
    compress_tree,
    resolve_plan,
    tree_leaves_with_paths,
)
from ltjax._calibrate import InputStats
from ltjax._format import CompressedTensor, pack
from ltjax._progress import Progress

__all__ = [
    "CompressedDense",
    "CompressedReLU",
    "SparseDense",
    "relu",
    "CompressedDenseGeneral",
    "CompressedEmbed",
    "calibration_stats",
    "compress_params",
    "intercept",
]

Array = jax.Array


def _where(m: linen.Module) -> str:
    path = "/".join(str(p) for p in (m.scope.path if m.scope is not None else ()))
    return f"{type(m).__name__} at {path or '<root>'!r}"


def _tuple(x: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, Iterable) else (x,)


def _promote(m, *args, inexact=True):
    """The module's ``promote_dtype`` with a 0-size stand-in for the compressed kernel."""
    return m.promote_dtype(*args, dtype=m.dtype, inexact=inexact)


# ---------------------------------------------------------------------- the math, per module kind
def _dense(m, inputs: Array, kernel: CompressedTensor, bias: Array | None) -> Array:
    where = _where(m)
    _layers.check_unbatched(kernel, where)
    _no_custom_dot(m, where)
    want = (inputs.shape[-1], m.features)
    if tuple(kernel.shape) != want:
        raise ValueError(
            f"{where}: compressed kernel shape={kernel.shape} does not match (in_features, features)={want} "
            f"for inputs of shape={inputs.shape}"
        )
    inputs, stand_in, bias = _promote(m, inputs, jnp.zeros((0,), kernel.dtype), bias)
    with jax.named_scope("ltjax.nn.dense"):
        return _layers.linear(inputs, kernel, bias, dtype=stand_in.dtype, precision=m.precision)


def _no_custom_dot(m, where: str) -> None:
    if getattr(m, "dot_general", None) is not None or getattr(m, "dot_general_cls", None) is not None:
        raise ValueError(f"{where}: a custom dot_general / dot_general_cls cannot run on a compressed kernel; "
                         "skip this module's kernel in the Policy, or drop the custom dot_general")


def _dense_general(m, inputs: Array, kernel: CompressedTensor, bias: Array | None) -> Array:
    where = _where(m)
    _layers.check_unbatched(kernel, where)
    _no_custom_dot(m, where)
    features, batch_dims = _tuple(m.features), tuple(a % inputs.ndim for a in _tuple(m.batch_dims))
    axis = tuple(a % inputs.ndim for a in _tuple(m.axis))
    inputs, stand_in, bias = _promote(m, inputs, jnp.zeros((0,), kernel.dtype), bias)
    kernel_shape = tuple(inputs.shape[a] for a in batch_dims + axis) + features
    nb = len(batch_dims)
    dims = ((axis, tuple(range(nb, nb + len(axis)))), (batch_dims, tuple(range(nb))))
    with jax.named_scope("ltjax.nn.dense_general"):
        y = _layers.general(
            inputs, kernel, _layout.dense_general_contraction(inputs.ndim, len(kernel_shape), axis, batch_dims),
            kernel_shape, lambda x, w: lax.dot_general(x, w, dims), dtype=stand_in.dtype, precision=m.precision,
            where=where, why=f"batch_dims={batch_dims} make it a batched product, not one matmul",
        )
        if bias is not None:
            expanded = tuple(inputs.shape[a] if a in batch_dims else 1 for a in range(inputs.ndim) if a not in axis)
            y = y + jnp.reshape(bias, expanded + features)
    return y


def _check_table(m, table: CompressedTensor) -> None:
    where = _where(m)
    _layers.check_unbatched(table, where)
    want = (m.num_embeddings, m.features)
    if tuple(table.shape) != want:
        raise ValueError(
            f"{where}: compressed embedding shape={table.shape} does not match (num_embeddings, features)={want}"
        )


def _embed(m, inputs: Array, table: CompressedTensor) -> Array:
    _check_table(m, table)
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError("Input type must be an integer or unsigned integer.")
    (stand_in,) = _promote(m, jnp.zeros((0,), table.dtype), inexact=False)
    with jax.named_scope("ltjax.nn.embed"):
        if m.num_embeddings == 1:
            row = _layers.take_rows(table, jnp.zeros((), jnp.int32), stand_in.dtype)
            return jnp.broadcast_to(row, inputs.shape + (m.features,))
        return _layers.take_rows(table, inputs, stand_in.dtype)


def _attend(m, query: Array, table: CompressedTensor) -> Array:
    _check_table(m, table)
    query, stand_in = _promote(m, query, jnp.zeros((0,), table.dtype))
    with jax.named_scope("ltjax.nn.attend"):
        return _layers.attend(query, table, dtype=stand_in.dtype)


def _einsum(m, inputs: Array, einsum_str: str | None, kernel: CompressedTensor, bias: Array | None) -> Array:
    """nn.Einsum on a compressed kernel: one `ltjax.matmul` where the equation is a matmul."""
    where = _where(m)
    _layers.check_unbatched(kernel, where)
    einsum_str = linen.module.merge_param("einsum_str", m.einsum_str, einsum_str).replace(" ", "")
    shape = tuple(m.shape)
    inputs, stand_in, bias = _promote(m, inputs, jnp.zeros((0,), kernel.dtype), bias)
    pet = m.preferred_element_type
    inputs, dtype = _layers.accumulation(inputs, stand_in.dtype, pet)
    contraction, why = _layout.einsum_contraction(einsum_str, inputs.ndim, len(shape))
    with jax.named_scope("ltjax.nn.einsum"):
        y = _layers.general(
            inputs, kernel, contraction, shape,
            lambda x, w: jnp.einsum(einsum_str, x, w, preferred_element_type=pet),
            dtype=dtype, precision=m.precision, where=where, why=f"{einsum_str!r} is not one matmul: {why}",
        )
    if bias is not None:
        _, broadcast = m._get_bias_shape(einsum_str, inputs, jax.ShapeDtypeStruct(shape, dtype))
        y = y + jnp.reshape(bias, broadcast)
    return y


# ---------------------------------------------------------------------- modules
def _get_or_init(m: linen.Module, name: str, init_fn, shape, dtype):
    """A compressed param as it is (no re-init shape check); a dense one through ``m.param``."""
    if m.has_variable("params", name):
        value = m.get_variable("params", name)
        if isinstance(value, CompressedTensor):
            return value
    return m.param(name, init_fn, shape, dtype)


class CompressedDense(linen.Module):
    """``flax.linen.Dense`` whose kernel may be a `CompressedTensor`, computed with `ltjax.matmul`.

    Creates the same params as ``nn.Dense`` (a dense ``kernel [in, features]`` and ``bias``);
    compress them with `ltjax.compress_tree`. ``precision`` applies to the matmul.

    Attributes:
      features: the number of output features.
      use_bias: whether to add a bias to the output (default: True).
      dtype: the dtype of the computation (default: infer from input and params).
      param_dtype: the dtype passed to parameter initializers (default: float32).
      precision: numerical precision of the computation, see ``jax.lax.Precision``.
      kernel_init: initializer function for the weight matrix.
      bias_init: initializer function for the bias.
      promote_dtype: promotes ``(inputs, kernel, bias)`` to one dtype (flax's by default).

    >>> import jax, jax.numpy as jnp, ltjax
    >>> layer = ltjax.nn.CompressedDense(features=128)
    >>> x = jax.random.normal(jax.random.key(0), (2, 256))
    >>> params = layer.init(jax.random.key(1), x)["params"]
    >>> cparams = ltjax.compress_tree(params, ltjax.Policy(codec="int8"))
    >>> cparams["kernel"].codec, layer.apply({"params": cparams}, x).shape
    ('int8', (2, 128))
    """

    features: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = initializers.zeros_init()
    promote_dtype: Callable = _promote_dtype

    dot_general = None  # read by flax's Dense body on dense params; not a field
    dot_general_cls = None

    @linen.compact
    def __call__(self, inputs: Array) -> Array:
        kernel = _param(self, "kernel")
        if isinstance(kernel, CompressedTensor):
            return _dense(self, inputs, kernel, _bias(self))
        return linen.Dense.__call__(self, inputs)  # init, or dense params: flax's own body


class CompressedDenseGeneral(linen.Module):
    """``flax.linen.DenseGeneral`` whose kernel may be a `CompressedTensor`.

    The contraction runs as one `ltjax.matmul` after moving the contracted input axes last
    and flattening them, when the kernel is stored as a ``[K, N]`` matmul kernel: flattened
    to 2-D (`compress_params` does this), or N-D with the channel axis last and a single
    output feature axis (e.g. an attention output projection ``[heads, head_dim, features]``
    under the default ``axis=-1``). Other layouts, and kernels with ``batch_dims``, are
    decompressed before the contraction (logged once).

    Attributes:
      features: int or tuple with number of output features.
      axis: int or tuple with axes to apply the transformation on.
      batch_dims: tuple with batch axes.
      use_bias: whether to add a bias to the output (default: True).
      dtype: the dtype of the computation (default: infer from input and params).
      param_dtype: the dtype passed to parameter initializers (default: float32).
      kernel_init: initializer function for the weight matrix.
      bias_init: initializer function for the bias.
      precision: numerical precision of the computation, see ``jax.lax.Precision``.
      promote_dtype: promotes ``(inputs, kernel, bias)`` to one dtype.

    >>> import jax, ltjax
    >>> layer = ltjax.nn.CompressedDenseGeneral(features=64, axis=(-2, -1))
    >>> x = jax.random.normal(jax.random.key(0), (2, 5, 8, 32))
    >>> params = layer.init(jax.random.key(1), x)["params"]
    >>> cparams = ltjax.compress_tree(params, ltjax.Policy(codec="int8"))
    >>> layer.apply({"params": cparams}, x).shape
    (2, 5, 64)
    """

    features: int | Sequence[int]
    axis: int | Sequence[int] = -1
    batch_dims: Sequence[int] = ()
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = initializers.zeros_init()
    precision: Any = None
    promote_dtype: Callable = _promote_dtype

    dot_general = None  # read by flax's DenseGeneral body on dense params; not a field
    dot_general_cls = None

    @linen.compact
    def __call__(self, inputs: Array) -> Array:
        kernel = _param(self, "kernel")
        if isinstance(kernel, CompressedTensor):
            return _dense_general(self, inputs, kernel, _bias(self))
        return linen.DenseGeneral.__call__(self, inputs)  # init, or dense params: flax's own body


class CompressedEmbed(linen.Module):
    """``flax.linen.Embed`` whose table may be a `CompressedTensor`.

    Lookups decode only the gathered rows for ``raw`` and ``int8`` tables (channel axis 0,
    `Policy`'s default for ``*embedding``, or 1); ``attend`` is ``ltjax.matmul(query, table.T)``.

    Attributes:
      num_embeddings: number of embeddings / vocab size.
      features: number of feature dimensions for each embedding.
      dtype: the dtype of the embedding vectors (default: same as embedding).
      param_dtype: the dtype passed to parameter initializers (default: float32).
      embedding_init: embedding initializer.
      promote_dtype: promotes ``(embedding,)`` or ``(query, embedding)`` to one dtype.

    >>> import jax, jax.numpy as jnp, ltjax
    >>> layer = ltjax.nn.CompressedEmbed(num_embeddings=512, features=64)
    >>> ids = jnp.array([[0, 5, 511]])
    >>> params = layer.init(jax.random.key(0), ids)["params"]
    >>> cparams = ltjax.compress_tree(params, ltjax.Policy(codec="int8"))
    >>> layer.apply({"params": cparams}, ids).shape
    (1, 3, 64)
    """

    num_embeddings: int
    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    embedding_init: Callable = default_embed_init
    promote_dtype: Callable = _promote_dtype

    def setup(self):
        self.embedding = _get_or_init(
            self, "embedding", self.embedding_init, (self.num_embeddings, self.features), self.param_dtype
        )

    def __call__(self, inputs: Array) -> Array:
        if isinstance(self.embedding, CompressedTensor):
            return _embed(self, inputs, self.embedding)
        return linen.Embed.__call__(self, inputs)

    def attend(self, query: Array) -> Array:
        if isinstance(self.embedding, CompressedTensor):
            return _attend(self, query, self.embedding)
        return linen.Embed.attend(self, query)


# ---------------------------------------------------------------------- interception
def _param(m: linen.Module, name: str):
    return m.get_variable("params", name) if m.has_variable("params", name) else None


def _bias(m: linen.Module):
    """The bias, decompressed if a broad policy compressed it (biases are small)."""
    bias = _param(m, "bias") if m.use_bias else None
    return _layers.decompress(bias) if isinstance(bias, CompressedTensor) else bias


# The upstream methods `intercept` runs on compressed params, and the arguments it handles:
# every argument of the upstream signature (tests/test_flax.py compares them, so a flax
# release that adds one fails there instead of being silently ignored here).
HANDLED_ARGS = {
    (linen.Dense, "__call__"): ("inputs",),
    (linen.DenseGeneral, "__call__"): ("inputs",),
    (linen.Einsum, "__call__"): ("inputs", "einsum_str"),
    (linen.Embed, "__call__"): ("inputs",),
    (linen.Embed, "attend"): ("query",),
}


def _bind(cls, method: str, m, args, kwargs) -> dict:
    """The call's arguments by name, checked against the upstream signature (defaults filled in)."""
    bound = inspect.signature(getattr(cls, method)).bind(m, *args, **kwargs)
    bound.apply_defaults()
    named = dict(bound.arguments)
    named.pop(next(iter(named)))  # self
    extra = [k for k in named if k not in HANDLED_ARGS[(cls, method)]]
    if extra:
        raise ValueError(
            f"{_where(m)}: ltjax.nn.intercept does not handle the arguments {extra} of {cls.__name__}.{method}"
        )
    return named


def _interceptor(next_fun, args, kwargs, context):
    m, method = context.module, context.method_name
    if isinstance(m, (linen.Dense, linen.DenseGeneral, linen.Einsum)) and method == "__call__":
        kernel = _param(m, "kernel")
        if isinstance(kernel, CompressedTensor):
            bias = _bias(m)
            if isinstance(m, linen.Dense):
                return _dense(m, _bind(linen.Dense, method, m, args, kwargs)["inputs"], kernel, bias)
            if isinstance(m, linen.DenseGeneral):
                return _dense_general(m, _bind(linen.DenseGeneral, method, m, args, kwargs)["inputs"], kernel, bias)
            a = _bind(linen.Einsum, method, m, args, kwargs)
            return _einsum(m, a["inputs"], a["einsum_str"], kernel, bias)
    elif isinstance(m, linen.Embed) and method in ("setup", "__call__", "attend"):
        table = _param(m, "embedding")
        if isinstance(table, CompressedTensor):
            if method == "setup":  # flax's setup would compare the table's leaves with a dense init
                m.embedding = table
                return None
            if method == "__call__":
                return _embed(m, _bind(linen.Embed, method, m, args, kwargs)["inputs"], table)
            return _attend(m, _bind(linen.Embed, method, m, args, kwargs)["query"], table)
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def intercept():
    """Runs unmodified ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Embed`` / ``nn.Einsum`` on compressed params.

    Inside the context, a module whose ``kernel`` (``embedding``) in the applied params is a
    `CompressedTensor` computes with `ltjax.matmul` (row gathers for ``Embed``) instead of
    its own body; modules with dense params run unchanged. A compressed kernel whose shape
    disagrees with the module raises a ``ValueError`` naming the module path. Works inside
    ``nn.remat`` and ``nn.scan`` (scanned params: see `compress_params`).

    >>> import jax, flax.linen as nn, ltjax
    >>> model = nn.Dense(64)
    >>> x = jax.random.normal(jax.random.key(0), (1, 256))
    >>> cparams = ltjax.compress_tree(model.init(jax.random.key(1), x)["params"], ltjax.Policy(codec="int8"))
    >>> with ltjax.nn.intercept():
    ...     model.apply({"params": cparams}, x).shape
    (1, 64)
    """
    with linen.intercept_methods(_interceptor):
        yield


# ---------------------------------------------------------------------- params
_STACKABLE = ("int8", "int4", "raw")  # one layout for every layer (bitmask codecs' nonzero counts differ)


def compress_params(
    params: Any,
    policy: Policy | None = None,
    *,
    model: linen.Module | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    stacked: str | Sequence[str] = (),
    flatten: Mapping[str, int] | None = None,
    calibration: Mapping[str, InputStats] | None = None,
    return_report: bool = False,
):
    """`ltjax.compress_tree` for linen params: kernels stored as the matmuls their modules run.

    Every N-D ``DenseGeneral`` / ``Einsum`` kernel is stored as the 2-D ``[K, N]`` matmul
    kernel of its contraction (its axes transposed to contracted-then-features, then
    flattened), so `intercept` runs it as one `ltjax.matmul` with no dense copy. Which axes a
    module contracts is read from the model itself when ``model`` is given: an abstract trace
    of ``model.apply({"params": params}, *args, **kwargs)`` (``jax.eval_shape``: nothing is
    computed) records every ``DenseGeneral`` and ``Einsum`` call. Without ``model``, a
    ``kernel`` beside a ``bias`` is read by flax's DenseGeneral convention (the bias has the
    features' shape) and other N-D kernels keep their shape (`intercept` decompresses those
    whose contraction is not over their leading axes, and logs it once).

    Leaves with a leading layer axis (params of ``nn.scan`` / ``nn.vmap`` with
    ``variable_axes={"params": 0}``: found by the trace, or named by ``stacked``) are
    compressed layer by layer and stacked under one header describing a single layer, so
    ``nn.scan`` slices them into valid per-layer `CompressedTensor` s. All layers share one
    codec: the policy's, or under ``"auto"`` the smallest of ``int8`` / ``raw`` within the
    error budget on every layer (bitmask codecs store a different nonzero count per layer and
    cannot be stacked; such leaves stay dense, with the reason in the report).

    Args:
      params: a flax param tree (the ``"params"`` collection).
      policy: the `ltjax.Policy` (default ``Policy()``; with ``max_bytes`` / ``bits``: planned by
        `ltjax.plan` over the kernels as stored here), or a `ltjax.Plan` made with the same
        ``model`` (``ltjax.plan(params, ..., model=model, args=args)``).
      model: the linen module whose params these are (optional, recommended).
      args: example positional arguments of ``model.apply`` after the variables (arrays or
        ``jax.ShapeDtypeStruct`` s).
      kwargs: keyword arguments of ``model.apply`` (e.g. ``{"deterministic": True}``);
        collections the model creates (``batch_stats``, ``cache``) are made on the fly.
      stacked: glob patterns on ``a/b/kernel`` leaf paths of stacked leaves, e.g.
        ``"ScanBlock_0/*"``; a pattern that matches no leaf raises ``ValueError``.
      flatten: ``{pattern: n_in}``: kernels ``[*in, *features]`` (after any stacked axis) to
        store as ``[prod(in), prod(features)]``, ``n_in`` being the number of contracted
        axes; overrides what the trace or the bias found. A pattern that matches no leaf
        raises ``ValueError``.
      calibration: `calibration_stats`' ``{path: ltjax.InputStats}``: int4 kernels with
        statistics are quantized by GPTQ (a stacked kernel layer by layer).
      return_report: also return the `ltjax.CompressionReport`.

    >>> import jax, flax.linen as nn, ltjax
    >>> attn = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=128, use_bias=False)
    >>> x = jax.numpy.ones((1, 8, 128))
    >>> params = attn.init(jax.random.key(0), x)["params"]
    >>> cparams = ltjax.nn.compress_params(params, ltjax.Policy(codec="int8"), model=attn, args=(x,))
    >>> cparams["query"]["kernel"].shape, cparams["out"]["kernel"].shape   # [K, N] matmul kernels
    ((128, 128), (4, 32, 128))
    >>> with ltjax.nn.intercept():
    ...     attn.apply({"params": cparams}, x).shape
    (1, 8, 128)
    """
    flat, hits = stored_leaves(params, model=model, args=args, kwargs=kwargs, stacked=stacked, flatten=flatten)
    treedef = jax.tree_util.tree_structure(params, is_leaf=lambda x: isinstance(x, CompressedTensor))
    stored = jax.tree_util.tree_unflatten(treedef, [leaf for _, leaf in flat])
    policy, calibration, plan = resolve_plan(stored, policy, calibration, None, flat_hits=(flat, hits))
    # Everything but the stacked leaves: the plain tree compression (which also reports skips).
    hold = dataclasses.replace(policy, skip=tuple(policy.skip) + tuple(glob.escape(h) for h in hits))
    out, report = compress_planned(stored, hold, {p: v for p, v in calibration.items() if p not in hits}, plan, None)
    leaves = dict(tree_leaves_with_paths(out))
    reports = {r.path: r for r in report.leaves}
    for path, leaf in flat:
        if path in hits and not isinstance(leaf, CompressedTensor):
            entry = None if plan is None else plan.entry(path)
            leaves[path], reports[path] = _compress_stacked(path, leaf, policy, calibration.get(path), entry,
                                                            plan is not None)
    new = [leaves[path] for path, _ in flat]
    tree = jax.tree_util.tree_unflatten(treedef, new)
    user_unmatched = tuple(p for p in report.unmatched_skip if p in policy.skip)
    rep = CompressionReport(tuple(reports[path] for path, _ in flat), user_unmatched)
    return (tree, rep) if return_report else tree


def stored_leaves(params: Any, *, model: linen.Module | None = None, args: Sequence[Any] = (),
                  kwargs: Mapping[str, Any] | None = None, stacked: str | Sequence[str] = (),
                  flatten: Mapping[str, int] | None = None) -> tuple[list[tuple[str, Any]], set[str]]:
    """``([(path, leaf as compress_params stores it)], stacked paths)``: each kernel in its [K, N]
    matmul layout (`compress_params`' arguments; ``model``'s trace or the bias convention)."""
    patterns = (stacked,) if isinstance(stacked, str) else tuple(stacked)
    flat = tree_leaves_with_paths(params)
    hits = {path for path, _ in flat if any(fnmatch.fnmatchcase(path, p) for p in patterns)}
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(path, p) for path, _ in flat)]
    flatten = dict(flatten or {})
    unmatched += [p for p in flatten if not any(fnmatch.fnmatchcase(path, p) for path, _ in flat)]
    if unmatched:
        raise ValueError(f"patterns matched no leaf: {unmatched}; leaf paths are like {flat[0][0]!r}")
    layouts = _layout.bias_layouts(flat, hits)
    if model is not None:
        by_path = dict(flat)
        for path, (layout, kernel_shape) in contractions(model, params, *args, **dict(kwargs or {})).items():
            leaf = by_path.get(path)
            if leaf is None or isinstance(leaf, CompressedTensor):
                continue
            if tuple(np.shape(leaf)[1:]) == kernel_shape:
                hits.add(path)  # a leading layer axis the module never sees: nn.scan / nn.vmap
            if layout is not None:
                layouts[path] = layout
    for path, leaf in flat:
        n_in = next((n for p, n in flatten.items() if fnmatch.fnmatchcase(path, p)), None)
        if n_in is not None and not isinstance(leaf, CompressedTensor):
            nd = np.ndim(leaf) - (path in hits)
            if not 0 < n_in < nd:
                raise ValueError(
                    f"flatten: {path!r} of shape={np.shape(leaf)} cannot split {n_in=} contracted axes "
                    "from its features"
                )
            layouts[path] = _layout.Layout(tuple(range(nd)), n_in)
    return [(path, _layout.in_layout(leaf, layouts.get(path), path in hits)) for path, leaf in flat], hits


def contractions(
    model: linen.Module, params: Any, *args, **kwargs
) -> dict[str, tuple[_layout.Layout | None, tuple[int, ...]]]:
    """``{param path: (layout, per-layer shape)}`` of every ``Dense`` / ``DenseGeneral`` /
    ``Einsum`` kernel and ``Embed`` table that ``model.apply({"params": params}, *args,
    **kwargs)`` uses, read by an abstract trace (``jax.eval_shape``: nothing is computed).
    ``layout`` is the kernel's `_layout.Layout` where its contraction is one matmul, else None."""
    found: dict[str, tuple[_layout.Layout | None, tuple[int, ...]]] = {}
    clash: set[str] = set()

    def layout_and_shape(m, a, kw):
        if isinstance(m, linen.Dense):
            x = _bind(linen.Dense, "__call__", m, a, kw)["inputs"]
            return _layout.Layout((0, 1), 1), (x.shape[-1], m.features)
        if isinstance(m, linen.DenseGeneral):
            x = _bind(linen.DenseGeneral, "__call__", m, a, kw)["inputs"]
            axis = tuple(i % x.ndim for i in _tuple(m.axis))
            batch = tuple(i % x.ndim for i in _tuple(m.batch_dims))
            shape = tuple(x.shape[i] for i in batch + axis) + _tuple(m.features)
            c = _layout.dense_general_contraction(x.ndim, len(shape), axis, batch)
            return (None if c is None else c.layout), shape
        b = _bind(linen.Einsum, "__call__", m, a, kw)
        eq = linen.module.merge_param("einsum_str", m.einsum_str, b["einsum_str"])
        c, _ = _layout.einsum_contraction(eq, b["inputs"].ndim, len(m.shape))
        return (None if c is None else c.layout), tuple(m.shape)

    def record(next_fun, a, kw, context):
        m, method = context.module, context.method_name
        kernels = (linen.Dense, linen.DenseGeneral, linen.Einsum)
        if m.scope is not None and method == "__call__" and isinstance(m, kernels):
            found_at("/".join(str(p) for p in m.scope.path + ("kernel",)), layout_and_shape(m, a, kw))
        elif m.scope is not None and method == "setup" and isinstance(m, linen.Embed):
            found_at("/".join(str(p) for p in m.scope.path + ("embedding",)), (None, (m.num_embeddings, m.features)))
        return next_fun(*a, **kw)

    def found_at(path, value):
        if found.get(path, value) != value:
            clash.add(path)
        found[path] = value

    kwargs = {"mutable": True, **kwargs}
    with linen.intercept_methods(record):
        jax.eval_shape(lambda p, *xs: model.apply({"params": p}, *xs, **kwargs), params, *args)
    if clash:
        _layers.note_once(f"contractions:{sorted(clash)}", f"ltjax: kernels {sorted(clash)} are contracted in more "
                          "than "
                          "one way by the model; they keep their shape (decompressed before the contraction)")
    return {p: (None, v[1]) if p in clash else v for p, v in found.items()}


def calibration_stats(
    model: linen.Module,
    params: Any,
    batches: Iterable[Any],
    *,
    kwargs: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> dict[str, InputStats]:
    """The input statistics GPTQ needs, per kernel: ``{param path: ltjax.InputStats}``.

    Runs ``model.apply({"params": params}, *batch, **kwargs)`` (jitted) on each batch with
    ``nn.intercept_methods``: the model is unmodified. Every ``Dense`` / ``DenseGeneral`` /
    ``Einsum`` whose contraction is one matmul has its inputs seen as that matmul's ``[M, K]``
    (`ltjax._layout.Contraction`: the ``[K, N]`` layout `compress_params` stores its kernel in),
    and ``X^T X`` (float32 on the device) comes back to the host by an ordered
    ``io_callback``, summed in float64: memory is K x K per kernel however many tokens pass.
    A kernel under ``nn.scan`` gets one ``[L, K, K]`` stack, layer by layer in scan order.
    Pass the result as ``calibration=`` to `compress_params`, `ltjax.compress_tree` or `ltjax.plan`.

    Args:
      model, params: the linen model and its ``"params"`` (dense).
      batches: positional arguments of ``model.apply`` after the variables, one tuple per batch
        (or one array per batch): a few hundred tokens or more in all.
      kwargs: keyword arguments of ``model.apply``.
      progress: a bar over the batches (`ltjax.compress_tree`'s rule).
    """
    from jax.experimental import io_callback

    batches = [b if isinstance(b, tuple) else (b,) for b in batches]
    if not batches:
        raise ValueError("calibration_stats: no batches")
    kwargs = dict(kwargs or {})
    by_path = dict(tree_leaves_with_paths(params))
    wanted = {p: shape for p, (layout, shape) in contractions(model, params, *batches[0], **kwargs).items()
              if layout is not None and not p.endswith("/embedding")}
    layers = {p: int(np.shape(by_path[p])[0]) for p, shape in wanted.items()
              if p in by_path and tuple(np.shape(by_path[p])[1:]) == tuple(shape)}
    xtx: dict[str, list[np.ndarray | None]] = {}
    count: dict[str, int] = {}
    calls: dict[str, int] = {}

    def host(path: str, m: int, value) -> None:
        i = calls.get(path, 0)
        calls[path] = i + 1
        n = layers.get(path, 1)
        acc = xtx.setdefault(path, [None] * n)
        v = np.asarray(value, np.float64)
        acc[i % n] = v if acc[i % n] is None else acc[i % n] + v
        if i % n == 0:
            count[path] = count.get(path, 0) + m

    def record(next_fun, a, kw, context):
        m = context.module
        if m.scope is not None and context.method_name == "__call__" and isinstance(
                m, (linen.Dense, linen.DenseGeneral, linen.Einsum)):
            path = "/".join(str(p) for p in m.scope.path + ("kernel",))
            x2 = _matmul_inputs(m, a, kw) if path in wanted else None
            if x2 is not None:
                x2 = x2.astype(jnp.float32)
                v = jnp.matmul(x2.T, x2, precision=lax.Precision.HIGHEST)
                io_callback(lambda v, p=path, n=x2.shape[0]: host(p, n, v), None, v, ordered=True)
        return next_fun(*a, **kw)

    fn = jax.jit(lambda p, *xs: model.apply({"params": p}, *xs, **{"mutable": True, **kwargs}))
    nbytes = lambda b: sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(b))
    with Progress("ltjax.calibration_stats", sum(nbytes(b) for b in batches), len(batches), progress) as bar:
        with linen.intercept_methods(record):
            for i, batch in enumerate(batches):
                bar.at(f"batch {i + 1}/{len(batches)}")
                jax.block_until_ready(fn(params, *batch))
                jax.effects_barrier()
                calls.clear()
                bar.step(nbytes(batch))
    return {p: InputStats(np.stack(v) if p in layers else v[0], count[p]) for p, v in xtx.items()
            if all(x is not None for x in v)}


def _matmul_inputs(m: linen.Module, a, kw) -> jax.Array | None:
    """A Dense / DenseGeneral / Einsum call's inputs as its matmul's ``[M, K]`` (None: not one matmul)."""
    if isinstance(m, linen.Dense):
        x = _bind(linen.Dense, "__call__", m, a, kw)["inputs"]
        return jnp.reshape(x, (-1, x.shape[-1]))
    if isinstance(m, linen.DenseGeneral):
        x = _bind(linen.DenseGeneral, "__call__", m, a, kw)["inputs"]
        axis = tuple(i % x.ndim for i in _tuple(m.axis))
        batch = tuple(i % x.ndim for i in _tuple(m.batch_dims))
        c = _layout.dense_general_contraction(x.ndim, len(axis) + len(_tuple(m.features)), axis, batch)
    else:
        b = _bind(linen.Einsum, "__call__", m, a, kw)
        x = b["inputs"]
        eq = linen.module.merge_param("einsum_str", m.einsum_str, b["einsum_str"])
        c, _ = _layout.einsum_contraction(eq, x.ndim, len(m.shape))
    return None if c is None else _layout.contraction_inputs(x, c)


def _compress_stacked(path: str, leaf: Any, policy: Policy, stats: InputStats | None = None,
                      entry: Any = None, planned: bool = False) -> tuple[Any, LeafReport]:
    """A stacked leaf (one layer per leading index), all layers under one codec and header; ``stats``:
    its calibration (``[L, K, K]``), ``entry``: its `ltjax.Plan` choice (``planned``: a plan is applied)."""
    a = np.asarray(leaf)
    nb = int(a.nbytes)
    dense = lambda why: (leaf, LeafReport(path, tuple(a.shape), str(a.dtype), "dense", nb, nb, None, why))
    if a.ndim < 1 or a.shape[0] == 0:
        return dense("stacked leaf has no layer axis")
    layers = [a[i] for i in range(a.shape[0])]
    per = _layer_tree_check(path, layers[0], policy)
    if per:
        return dense(per)
    if stats is not None and stats.stack_shape != (len(layers),):
        raise ValueError(f"{path}: calibration holds statistics of shape={stats.xtx.shape} for a stack of "
                         f"{len(layers)} layers")
    axis = policy.axis_for(path)
    int4 = dict(group=policy.group, asymmetric=policy.asymmetric)
    note = f"{len(layers)} stacked layers"
    if planned:
        if entry is None:
            return dense("not in the plan (the plan was made for another tree or policy)")
        o = entry.option
        if o.codec == "dense":
            return dense(f"plan: {entry.reason}")
        codec, int4, note = o.codec, dict(group=o.group, asymmetric=o.asymmetric), f"{note}; plan: {entry.reason}"
    elif policy.codec == "auto":
        budget = 0.0 if policy.error_budget is None else float(policy.error_budget)
        est = [analyze_array(l, name=path, tile=policy.tile, axis=axis, **int4) for l in layers]
        ok = [
            c
            for c in _STACKABLE
            if (c in policy.codecs or c == "raw") and all(s.estimate(c).rel_error <= budget for s in est)
        ]
        codec = min(ok, key=lambda c: est[0].estimate(c).nbytes)
    elif policy.codec in _STACKABLE:
        codec = policy.codec
    else:
        return dense(f"stacked layers cannot share one {policy.codec!r} layout (nonzero counts differ per layer)")
    try:
        cts = []
        for i, l in enumerate(layers):
            name = f"{path}[{i}]"
            if codec != "int4":
                cts.append(pack(l, codec, tile=policy.tile, axis=axis, name=name))
                continue
            arrays = None if stats is None else calibrated_int4(l, axis, stats.layer(i), int4["group"],
                                                                int4["asymmetric"], name=name,
                                                                act_order=policy.act_order)
            cts.append(pack(l, codec, tile=policy.tile, axis=axis, name=name, int4=arrays, **int4))
    except ValueError as e:
        if codec != "int4":
            raise
        return dense(str(e))  # e.g. int4's groups do not divide the reduction axis
    if codec == "int4" and stats is not None:
        note += f"; GPTQ on {stats.count} tokens"
    ct = jax.tree.map(lambda *xs: np.stack(xs), *cts)
    err = max(_rel_err(l, c) for l, c in zip(layers, cts))
    out_err = None
    if stats is not None:
        errs = [_output_error(l, c, stats.layer(i)) for i, (l, c) in enumerate(zip(layers, cts))]
        out_err = None if None in errs else max(errs)
    return ct, LeafReport(path, tuple(a.shape), ct.header.dtype, codec, nb, ct.nbytes, err, note, out_err)


def _layer_tree_check(path: str, layer: np.ndarray, policy: Policy) -> str:
    plain = dataclasses.replace(policy, codec="raw", max_bytes=None, bits=None)
    _, rep = compress_tree({path: layer}, plain, return_report=True)
    r = rep.leaves[0]
    return r.reason if r.codec == "dense" else ""


def _rel_err(x: np.ndarray, ct: CompressedTensor) -> float:
    if ct.codec == "raw":
        return 0.0
    d = np.asarray(_layers.decompress(ct), np.float64)
    x64 = x.astype(np.float64)
    den = float(np.linalg.norm(x64))
    return float(np.linalg.norm(d - x64)) / den if den else 0.0
