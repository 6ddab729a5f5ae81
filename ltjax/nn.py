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
import fnmatch
import glob
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype as _promote_dtype
from flax.linen.linear import default_embed_init, default_kernel_init

from ltjax import _layers
from ltjax._activation_modules import CompressedReLU, SparseDense
from ltjax._activations import relu
from ltjax._analyze import CompressionReport, LeafReport, Policy, analyze_array, compress_tree, tree_leaves_with_paths
from ltjax._format import CompressedTensor, pack

__all__ = [
    "CompressedDense",
    "CompressedReLU",
    "SparseDense",
    "relu",
    "CompressedDenseGeneral",
    "CompressedEmbed",
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
    want = (inputs.shape[-1], m.features)
    if tuple(kernel.shape) != want:
        raise ValueError(
            f"{where}: compressed kernel shape={kernel.shape} does not match (in_features, features)={want} "
            f"for inputs of shape={inputs.shape}"
        )
    inputs, stand_in, bias = _promote(m, inputs, jnp.zeros((0,), kernel.dtype), bias)
    with jax.named_scope("ltjax.nn.dense"):
        return _layers.linear(inputs, kernel, bias, dtype=stand_in.dtype, precision=m.precision)


def _dense_general(m, inputs: Array, kernel: CompressedTensor, bias: Array | None) -> Array:
    where = _where(m)
    _layers.check_unbatched(kernel, where)
    features, axis, batch_dims = _tuple(m.features), _tuple(m.axis), _tuple(m.batch_dims)
    inputs, stand_in, bias = _promote(m, inputs, jnp.zeros((0,), kernel.dtype), bias)
    with jax.named_scope("ltjax.nn.dense_general"):
        y = _layers.general_dot(
            inputs,
            kernel,
            axis=axis,
            batch_dims=batch_dims,
            features=features,
            dtype=stand_in.dtype,
            precision=m.precision,
            where=where,
        )
        if bias is not None:
            axis_n = {a % inputs.ndim for a in axis}
            batch_n = {a % inputs.ndim for a in batch_dims}
            expanded = tuple(inputs.shape[a] if a in batch_n else 1 for a in range(inputs.ndim) if a not in axis_n)
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
    """nn.Einsum on a compressed kernel: decompressed first (logged once)."""
    where = _where(m)
    _layers.check_unbatched(kernel, where)
    if tuple(kernel.shape) != tuple(m.shape) and not (kernel.ndim == 2 and kernel.size == np.prod(m.shape)):
        raise ValueError(f"{where}: compressed kernel shape={kernel.shape} does not match the module's shape={tuple(m.shape)}")
    einsum_str = linen.module.merge_param("einsum_str", m.einsum_str, einsum_str).replace(" ", "")
    _layers.note_once(f"einsum:{where}", f"ltjax: {where}: nn.Einsum decompresses its kernel before the einsum")
    dense = _layers.decompress(kernel).reshape(tuple(m.shape))
    inputs, dense, bias = _promote(m, inputs, dense, bias)
    with jax.named_scope("ltjax.nn.einsum"), _layers.matmul_precision(m.precision):
        y = jnp.einsum(einsum_str, inputs, dense, preferred_element_type=m.preferred_element_type)
    if bias is not None:
        _, broadcast = m._get_bias_shape(einsum_str, inputs, dense)
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


def _interceptor(next_fun, args, kwargs, context):
    m, method = context.module, context.method_name
    if isinstance(m, (linen.Dense, linen.DenseGeneral, linen.Einsum)) and method == "__call__":
        kernel = _param(m, "kernel")
        if isinstance(kernel, CompressedTensor):
            bias = _bias(m)
            if isinstance(m, linen.Dense):
                return _dense(m, *args, kernel, bias, **kwargs)
            if isinstance(m, linen.DenseGeneral):
                return _dense_general(m, *args, kernel, bias, **kwargs)
            inputs, *rest = args
            return _einsum(m, inputs, kwargs.get("einsum_str", rest[0] if rest else None), kernel, bias)
    elif isinstance(m, linen.Embed) and method in ("setup", "__call__", "attend"):
        table = _param(m, "embedding")
        if isinstance(table, CompressedTensor):
            if method == "setup":  # flax's setup would compare the table's leaves with a dense init
                m.embedding = table
                return None
            return (_embed if method == "__call__" else _attend)(m, *args, table, **kwargs)
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
_STACKABLE = ("int8", "raw")


def compress_params(
    params: Any,
    policy: Policy | None = None,
    *,
    stacked: str | Sequence[str] = (),
    flatten: Mapping[str, int] | None = None,
    return_report: bool = False,
):
    """`ltjax.compress_tree` plus the flax ``nn.scan`` convention for stacked layers.

    Leaves whose path matches a ``stacked`` glob pattern carry a leading layer axis (params
    of ``nn.scan`` / ``nn.vmap`` with ``variable_axes={"params": 0}``). Each layer is
    compressed on its own and the layers' arrays are stacked along a new leading axis under
    one shared header describing a single layer, so ``nn.scan`` slices the tensor into valid
    per-layer `CompressedTensor` s. All layers share one codec: the policy's, or under
    ``"auto"`` the smallest of ``int8`` / ``raw`` within the error budget on every layer
    (bitmask codecs store a different nonzero count per layer and cannot be stacked; such
    leaves stay dense, with the reason in the report). Other leaves go through
    `ltjax.compress_tree` unchanged.

    Args:
      params: a flax param tree (the ``"params"`` collection).
      policy: the `ltjax.Policy` (default ``Policy()``).
      stacked: glob patterns on ``a/b/kernel`` leaf paths, e.g. ``"ScanBlock_0/*"``; a
        pattern that matches no leaf raises ``ValueError``.
      flatten: ``{pattern: n_in}``: N-D ``DenseGeneral`` kernels ``[*in, *features]`` (after
        any stacked axis) to store flattened as the 2-D matmul kernel
        ``[prod(in), prod(features)]``, ``n_in`` being the number of contracted axes, e.g.
        ``{"*/query/kernel": 1}`` for a ``[embed, heads, head_dim]`` projection. Such kernels
        run as one `ltjax.matmul`; left N-D, only the ``[*in, features]`` layout does
        (`CompressedDenseGeneral`). A pattern that matches no leaf raises ``ValueError``.
      return_report: also return the `ltjax.CompressionReport`.

    >>> import numpy as np, ltjax
    >>> w = np.random.default_rng(0).standard_normal((4, 128, 64)).astype(np.float32)
    >>> tree = ltjax.nn.compress_params({"scan": {"kernel": w}}, ltjax.Policy(codec="int8"), stacked="scan/*")
    >>> ct = tree["scan"]["kernel"]
    >>> ct.shape, ct.codes.shape
    ((128, 64), (4, 64, 128))
    """
    policy = Policy() if policy is None else policy
    patterns = (stacked,) if isinstance(stacked, str) else tuple(stacked)
    flat = tree_leaves_with_paths(params)
    hits = {path for path, _ in flat if any(fnmatch.fnmatchcase(path, p) for p in patterns)}
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(path, p) for path, _ in flat)]
    flatten = dict(flatten or {})
    unmatched += [p for p in flatten if not any(fnmatch.fnmatchcase(path, p) for path, _ in flat)]
    if unmatched:
        raise ValueError(f"patterns matched no leaf: {unmatched}; leaf paths are like {flat[0][0]!r}")
    flat = [(path, _flattened(path, leaf, flatten, path in hits)) for path, leaf in flat]
    treedef = jax.tree_util.tree_structure(params, is_leaf=lambda x: isinstance(x, CompressedTensor))
    params = jax.tree_util.tree_unflatten(treedef, [leaf for _, leaf in flat])
    # Everything but the stacked leaves: the plain tree compression (which also reports skips).
    hold = policy.__class__(**{**_fields(policy), "skip": tuple(policy.skip) + tuple(glob.escape(h) for h in hits)})
    out, report = compress_tree(params, hold, return_report=True)
    leaves = dict(tree_leaves_with_paths(out))
    reports = {r.path: r for r in report.leaves}
    for path, leaf in flat:
        if path in hits and not isinstance(leaf, CompressedTensor):
            leaves[path], reports[path] = _compress_stacked(path, leaf, policy)
    new = [leaves[path] for path, _ in flat]
    tree = jax.tree_util.tree_unflatten(treedef, new)
    user_unmatched = tuple(p for p in report.unmatched_skip if p in policy.skip)
    rep = CompressionReport(tuple(reports[path] for path, _ in flat), user_unmatched)
    return (tree, rep) if return_report else tree


def _flattened(path: str, leaf: Any, flatten: Mapping[str, int], stacked: bool) -> Any:
    n_in = next((n for p, n in flatten.items() if fnmatch.fnmatchcase(path, p)), None)
    if n_in is None or isinstance(leaf, CompressedTensor):
        return leaf
    a = np.asarray(leaf)
    lead = a.shape[:1] if stacked else ()
    shape = a.shape[len(lead) :]
    if not 0 < n_in < len(shape):
        raise ValueError(f"flatten: {path!r} of shape={a.shape} cannot split {n_in=} contracted axes from its features")
    return a.reshape(lead + (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))))


def _fields(policy: Policy) -> dict:
    import dataclasses

    return {f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}


def _compress_stacked(path: str, leaf: Any, policy: Policy) -> tuple[Any, LeafReport]:
    a = np.asarray(leaf)
    nb = int(a.nbytes)
    dense = lambda why: (leaf, LeafReport(path, tuple(a.shape), str(a.dtype), "dense", nb, nb, None, why))
    if a.ndim < 1 or a.shape[0] == 0:
        return dense("stacked leaf has no layer axis")
    layers = [a[i] for i in range(a.shape[0])]
    per = _layer_tree_check(path, layers[0], policy)
    if per:
        return dense(per)
    axis = policy.axis_for(path)
    if policy.codec == "auto":
        budget = 0.0 if policy.error_budget is None else float(policy.error_budget)
        stats = [analyze_array(l, name=path, tile=policy.tile, axis=axis) for l in layers]
        ok = [
            c
            for c in _STACKABLE
            if (c in policy.codecs or c == "raw") and all(s.estimate(c).rel_error <= budget for s in stats)
        ]
        codec = min(ok, key=lambda c: stats[0].estimate(c).nbytes)
    elif policy.codec in _STACKABLE:
        codec = policy.codec
    else:
        return dense(f"stacked layers cannot share one {policy.codec!r} layout (nonzero counts differ per layer)")
    cts = [pack(l, codec, tile=policy.tile, axis=axis, name=f"{path}[{i}]") for i, l in enumerate(layers)]
    ct = jax.tree.map(lambda *xs: np.stack(xs), *cts)
    err = max(_rel_err(l, c) for l, c in zip(layers, cts))
    return ct, LeafReport(path, tuple(a.shape), ct.header.dtype, codec, nb, ct.nbytes, err, f"{len(layers)} stacked layers")


def _layer_tree_check(path: str, layer: np.ndarray, policy: Policy) -> str:
    _, rep = compress_tree({path: layer}, policy.__class__(**{**_fields(policy), "codec": "raw"}), return_report=True)
    r = rep.leaves[0]
    return r.reason if r.codec == "dense" else ""


def _rel_err(x: np.ndarray, ct: CompressedTensor) -> float:
    if ct.codec == "raw":
        return 0.0
    d = np.asarray(_layers.decompress(ct), np.float64)
    x64 = x.astype(np.float64)
    den = float(np.linalg.norm(x64))
    return float(np.linalg.norm(d - x64)) / den if den else 0.0
