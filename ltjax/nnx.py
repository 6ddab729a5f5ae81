"""Flax nnx integration: compressed Linear / LinearGeneral / Embed and in-place `compress_model`.

Compressed arrays live in `CompressedParam`, an ``nnx.Variable`` that is not an ``nnx.Param``:
``nnx.grad``, ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``nnx.state(model, nnx.Param)``
leave them alone, while biases and norms stay trainable ``nnx.Param`` s.

>>> import jax, jax.numpy as jnp, ltjax
>>> from flax import nnx
>>> model = nnx.Sequential(nnx.Linear(128, 256, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(256, 64, rngs=nnx.Rngs(1)))
>>> x = jax.random.normal(jax.random.key(0), (4, 128))
>>> y_dense = model(x)
>>> report = ltjax.nnx.compress_model(model, ltjax.Policy(codec="int8"))
>>> type(model.layers[0]).__name__, round(report.ratio, 1)
('CompressedLinear', 3.9)
>>> bool(jnp.allclose(nnx.jit(lambda m, x: m(x))(model, x), y_dense, atol=3e-2))
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn.linear import default_bias_init, default_embed_init, default_kernel_init
from jax import lax

from ltjax import _layers, _layout
from ltjax._activation_modules import NnxCompressedReLU as CompressedReLU, SparseLinear
from ltjax._analyze import CompressionReport, LeafReport, Policy, compress_tree
from ltjax._calibrate import InputStats
from ltjax._format import CompressedTensor
from ltjax._progress import Progress

__all__ = [
    "calibration_stats",
    "CompressedReLU",
    "SparseLinear",
    "CompressedEinsum",
    "CompressedEmbed",
    "CompressedLinear",
    "CompressedLinearGeneral",
    "CompressedParam",
    "compress_model",
    "index_rows",
]

Array = jax.Array
# The upstream defaults of the op attributes a compressed kernel replaces with `ltjax.matmul`.
_DEFAULT_OPS = {"dot_general": (None, lax.dot_general), "dot_general_cls": (None,), "einsum_op": (jnp.einsum,)}


class CompressedParam(nnx.Variable):
    """An ``nnx.Variable`` holding a `CompressedTensor` (frozen: not an ``nnx.Param``)."""


def _value(v):
    return None if v is None else v.get_value()


def _kernel_var(value, metadata) -> nnx.Variable:
    return CompressedParam(value, **metadata) if isinstance(value, CompressedTensor) else nnx.Param(value, **metadata)


def _stand_in(ct: CompressedTensor) -> Array:
    return jnp.zeros((0,), ct.dtype)


def _custom_op(m) -> str:
    """Why ``m``'s kernel cannot run on `ltjax.matmul` ('' if it can): a dot_general / einsum_op of its own."""
    custom = [a for a, defaults in _DEFAULT_OPS.items()
              if all(getattr(m, a, None) is not d for d in (None,) + defaults)]
    return f"a custom {' / '.join(custom)} cannot run on a compressed kernel" if custom else ""


def _no_custom_op(m, where: str) -> None:
    if _custom_op(m):
        raise ValueError(f"{where}: {_custom_op(m)}; skip this layer in the Policy, or use the default op")


class CompressedLinear(nnx.Module):
    """``flax.nnx.Linear`` whose kernel may be a `CompressedTensor` (in a `CompressedParam`).

    Constructed like ``nnx.Linear`` (a dense ``nnx.Param`` kernel); `compress_model` turns the
    kernel into a `CompressedParam`. Computes ``ltjax.matmul(x, W) + b`` with flax's dtype
    promotion; ``precision`` applies to the matmul. On a dense kernel it is ``nnx.Linear``.

    Args:
      in_features: the number of input features.
      out_features: the number of output features.
      use_bias: whether to add a bias to the output (default: True).
      dtype: the dtype of the computation (default: infer from input and params).
      param_dtype: the dtype passed to parameter initializers (default: float32).
      precision: numerical precision of the computation, see ``jax.lax.Precision``.
      kernel_init: initializer function for the weight matrix.
      bias_init: initializer function for the bias.
      dot_general: dot product function (dense kernels only: a compressed kernel runs on
        `ltjax.matmul`, and `compress_model` leaves layers with a custom one dense).
      promote_dtype: promotes ``(inputs, kernel, bias)`` to one dtype.
      preferred_element_type: the accumulation and result dtype.
      rngs: rng key.
      kernel_metadata: metadata for the kernel variable.
      bias_metadata: metadata for the bias variable.

    >>> import jax, ltjax
    >>> from flax import nnx
    >>> layer = ltjax.nnx.CompressedLinear(256, 64, rngs=nnx.Rngs(0))
    >>> _ = ltjax.nnx.compress_model(layer, ltjax.Policy(codec="int8"))
    >>> type(layer.kernel).__name__, layer(jax.numpy.ones((2, 256))).shape
    ('CompressedParam', (2, 64))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init=default_kernel_init,
        bias_init=default_bias_init,
        dot_general=lax.dot_general,
        promote_dtype=nnx_dtypes.promote_dtype,
        preferred_element_type: Any = None,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        self._adopt(nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                               precision=precision, kernel_init=kernel_init, bias_init=bias_init,
                               dot_general=dot_general, promote_dtype=promote_dtype,
                               preferred_element_type=preferred_element_type, rngs=rngs,
                               kernel_metadata=kernel_metadata, bias_metadata=bias_metadata))

    _ATTRS = ("in_features", "out_features", "use_bias", "dtype", "param_dtype", "precision", "dot_general",
              "promote_dtype", "preferred_element_type")

    def _adopt(self, m: nnx.Module, kernel: nnx.Variable | None = None) -> None:
        for a in self._ATTRS:
            setattr(self, a, getattr(m, a))
        self.kernel, self.bias = (m.kernel if kernel is None else kernel), nnx.data(m.bias)

    def __call__(self, inputs: Array, out_sharding=None) -> Array:
        kernel, bias = _value(self.kernel), _value(self.bias)
        if not isinstance(kernel, CompressedTensor):
            return nnx.Linear.__call__(self, inputs, out_sharding)
        where = f"CompressedLinear({self.in_features}, {self.out_features})"
        _layers.check_unbatched(kernel, where)
        _no_custom_op(self, where)
        if tuple(kernel.shape) != (inputs.shape[-1], self.out_features):
            raise ValueError(
                f"{where}: compressed kernel shape={kernel.shape} does not match "
                f"(in_features, out_features)={(inputs.shape[-1], self.out_features)}"
            )
        inputs, stand_in, bias = self.promote_dtype((inputs, _stand_in(kernel), bias), dtype=self.dtype)
        inputs, dtype = _layers.accumulation(inputs, stand_in.dtype, self.preferred_element_type)
        with jax.named_scope("ltjax.nnx.linear"):
            y = _layers.linear(inputs, kernel, bias, dtype=dtype, precision=self.precision)
        return _layers.out_sharded(y, out_sharding)


class CompressedLinearGeneral(nnx.Module):
    """``flax.nnx.LinearGeneral`` whose kernel may be a `CompressedTensor`.

    The contraction is one `ltjax.matmul` when the kernel is stored as a ``[K, N]`` matmul
    kernel (`compress_model` stores it flattened to ``[prod(in), prod(out)]``); kernels with
    ``batch_axis`` are decompressed before the contraction (logged once). On a dense kernel it
    is ``nnx.LinearGeneral``.

    Args:
      in_features: int or tuple with number of input features.
      out_features: int or tuple with number of output features.
      axis: int or tuple with axes to apply the transformation on.
      batch_axis: mapping of batch axes to their sizes.
      use_bias: whether to add a bias to the output (default: True).
      dtype: the dtype of the computation (default: infer from input and params).
      param_dtype: the dtype passed to parameter initializers (default: float32).
      kernel_init: initializer function for the weight matrix.
      bias_init: initializer function for the bias.
      precision: numerical precision of the computation, see ``jax.lax.Precision``.
      promote_dtype: promotes ``(inputs, kernel, bias)`` to one dtype.
      dot_general / dot_general_cls: dense kernels only (as `CompressedLinear`'s ``dot_general``).
      preferred_element_type: the accumulation and result dtype.
      rngs: rng key.
      kernel_metadata: metadata for the kernel variable.
      bias_metadata: metadata for the bias variable.

    >>> import jax, ltjax
    >>> from flax import nnx
    >>> layer = ltjax.nnx.CompressedLinearGeneral(128, (4, 32), rngs=nnx.Rngs(0))
    >>> _ = ltjax.nnx.compress_model(layer, ltjax.Policy(codec="int8"))
    >>> layer.kernel.get_value().shape, layer(jax.numpy.ones((2, 128))).shape
    ((128, 128), (2, 4, 32))
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        axis: int | Sequence[int] = -1,
        batch_axis: Mapping[int, int] = FrozenDict({}),
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init=default_kernel_init,
        bias_init=default_bias_init,
        precision: Any = None,
        promote_dtype=nnx_dtypes.promote_dtype,
        dot_general=None,
        dot_general_cls: Any = None,
        preferred_element_type: Any = None,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        self._adopt(nnx.LinearGeneral(
            in_features, out_features, axis=axis, batch_axis=batch_axis, use_bias=use_bias, dtype=dtype,
            param_dtype=param_dtype, kernel_init=kernel_init, bias_init=bias_init, precision=precision,
            promote_dtype=promote_dtype, dot_general=dot_general, dot_general_cls=dot_general_cls,
            preferred_element_type=preferred_element_type, rngs=rngs, kernel_metadata=kernel_metadata,
            bias_metadata=bias_metadata,
        ))

    _ATTRS = ("in_features", "out_features", "axis", "batch_axis", "use_bias", "dtype", "param_dtype", "precision",
              "promote_dtype", "dot_general", "dot_general_cls", "preferred_element_type")
    _adopt = CompressedLinear._adopt

    def __call__(self, inputs: Array, out_sharding=None) -> Array:
        kernel, bias = _value(self.kernel), _value(self.bias)
        if not isinstance(kernel, CompressedTensor):
            return nnx.LinearGeneral.__call__(self, inputs, out_sharding)
        where = f"CompressedLinearGeneral({self.in_features}, {self.out_features})"
        _layers.check_unbatched(kernel, where)
        _no_custom_op(self, where)
        axis = tuple(a % inputs.ndim for a in self.axis)
        batch = tuple(a % inputs.ndim for a in self.batch_axis.keys())
        kernel_shape = tuple(self.batch_axis.values()) + tuple(self.in_features) + tuple(self.out_features)
        inputs, stand_in, bias = self.promote_dtype((inputs, _stand_in(kernel), bias), dtype=self.dtype)
        inputs, dtype = _layers.accumulation(inputs, stand_in.dtype, self.preferred_element_type)
        nb = len(batch)
        dims = ((axis, tuple(range(nb, nb + len(axis)))), (batch, tuple(range(nb))))
        with jax.named_scope("ltjax.nnx.linear_general"):
            y = _layers.general(
                inputs, kernel, _layout.dense_general_contraction(inputs.ndim, len(kernel_shape), axis, batch),
                kernel_shape,
                lambda x, w: lax.dot_general(x, w, dims, preferred_element_type=self.preferred_element_type),
                dtype=dtype, precision=self.precision, where=where,
                why=f"batch_axis={dict(self.batch_axis)} makes it a batched product, not one matmul",
            )
        if bias is not None:
            expanded = tuple(inputs.shape[a] if a in batch else 1 for a in range(inputs.ndim) if a not in axis)
            y = y + jnp.reshape(bias, expanded + tuple(self.out_features))
        return _layers.out_sharded(y, out_sharding)


class CompressedEinsum(nnx.Module):
    """``flax.nnx.Einsum`` whose kernel may be a `CompressedTensor`.

    Where the equation is a matmul (every kernel letter either contracted with the input or an
    output feature), `compress_model` stores the kernel as its ``[K, N]`` matmul kernel (axes
    transposed to contracted-then-features, flattened; ``kernel_layout`` records how) and the
    call is one `ltjax.matmul`; other equations decompress the kernel first (logged once). On a
    dense kernel it is ``nnx.Einsum``.

    Args:
      einsum_str: the equation ``"input,kernel->output"``.
      kernel_shape: the shape of the kernel.
      bias_shape: the shape of the bias (None: no bias).
      dtype: the dtype of the computation (default: infer from input and params).
      param_dtype: the dtype passed to parameter initializers (default: float32).
      precision: numerical precision of the computation, see ``jax.lax.Precision``.
      kernel_init: initializer function for the weight matrix.
      bias_init: initializer function for the bias.
      promote_dtype: promotes ``(inputs, kernel, bias)`` to one dtype.
      einsum_op: dense kernels only (as `CompressedLinear`'s ``dot_general``).
      preferred_element_type: the accumulation and result dtype.
      rngs: rng key.
      kernel_metadata: metadata for the kernel variable.
      bias_metadata: metadata for the bias variable.

    >>> import jax, ltjax
    >>> from flax import nnx
    >>> layer = ltjax.nnx.CompressedEinsum("btd,dhk->bthk", (128, 4, 32), (4, 32), rngs=nnx.Rngs(0))
    >>> _ = ltjax.nnx.compress_model(layer, ltjax.Policy(codec="int8"))
    >>> layer.kernel.get_value().shape, layer(jax.numpy.ones((2, 3, 128))).shape
    ((128, 128), (2, 3, 4, 32))
    """

    def __init__(
        self,
        einsum_str: str,
        kernel_shape: Sequence[int],
        bias_shape: Sequence[int] | None = None,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init=default_kernel_init,
        bias_init=default_bias_init,
        promote_dtype=nnx_dtypes.promote_dtype,
        einsum_op=jnp.einsum,
        preferred_element_type: Any = None,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        self._adopt(nnx.Einsum(
            einsum_str, kernel_shape, bias_shape, dtype=dtype, param_dtype=param_dtype, precision=precision,
            kernel_init=kernel_init, bias_init=bias_init, promote_dtype=promote_dtype, einsum_op=einsum_op,
            preferred_element_type=preferred_element_type, rngs=rngs, kernel_metadata=kernel_metadata,
            bias_metadata=bias_metadata,
        ))
        self.kernel_layout = None

    _ATTRS = ("einsum_str", "kernel_shape", "bias_shape", "dtype", "param_dtype", "precision", "promote_dtype",
              "einsum_op", "preferred_element_type")
    _adopt = CompressedLinear._adopt
    _einsum_str_check = nnx.Einsum._einsum_str_check
    _infer_broadcasted_bias_shape = nnx.Einsum._infer_broadcasted_bias_shape

    def __call__(self, inputs: Array, einsum_str: str | None = None, out_sharding=None) -> Array:
        kernel, bias = _value(self.kernel), _value(self.bias)
        if not isinstance(kernel, CompressedTensor):
            return nnx.Einsum.__call__(self, inputs, einsum_str, out_sharding)
        einsum_str = (self.einsum_str if einsum_str is None else einsum_str).replace(" ", "")
        self._einsum_str_check(einsum_str)
        where = f"CompressedEinsum({einsum_str!r}, {tuple(self.kernel_shape)})"
        _layers.check_unbatched(kernel, where)
        _no_custom_op(self, where)
        shape = tuple(self.kernel_shape)
        inputs, stand_in, bias = self.promote_dtype((inputs, _stand_in(kernel), bias), dtype=self.dtype)
        pet = self.preferred_element_type
        inputs, dtype = _layers.accumulation(inputs, stand_in.dtype, pet)
        c, why = _layout.einsum_contraction(einsum_str, inputs.ndim, len(shape))
        stored = self.kernel_layout
        if c is not None and stored is not None and c.layout != stored:
            c, why = None, f"the kernel is stored for {self.einsum_str!r}, not this call's {einsum_str!r}"
        with jax.named_scope("ltjax.nnx.einsum"):
            y = _layers.general(
                inputs, kernel, c, shape, lambda x, w: jnp.einsum(einsum_str, x, w, preferred_element_type=pet),
                dtype=dtype, precision=self.precision, where=where, why=f"{einsum_str!r} is not one matmul: {why}",
                layout=stored,
            )
        if bias is not None:
            kernel = jax.ShapeDtypeStruct(shape, dtype)
            y = y + jnp.reshape(bias, self._infer_broadcasted_bias_shape(einsum_str, inputs, kernel))
        return _layers.out_sharded(y, out_sharding)


class CompressedEmbed(nnx.Module):
    """``flax.nnx.Embed`` whose table may be a `CompressedTensor`.

    Lookups decode only the gathered rows for ``raw`` / ``int8`` tables; ``attend`` is
    ``ltjax.matmul(query, table.T)``.

    Args:
      num_embeddings: number of embeddings / vocab size.
      features: number of feature dimensions for each embedding.
      dtype: the dtype of the embedding vectors (default: same as embedding).
      param_dtype: the dtype passed to parameter initializers (default: float32).
      embedding_init: embedding initializer.
      promote_dtype: promotes ``(embedding,)`` or ``(query, embedding)`` to one dtype.
      rngs: rng key.
      embedding_metadata: metadata for the embedding variable.

    >>> import jax.numpy as jnp, ltjax
    >>> from flax import nnx
    >>> layer = ltjax.nnx.CompressedEmbed(512, 64, rngs=nnx.Rngs(0))
    >>> _ = ltjax.nnx.compress_model(layer, ltjax.Policy(codec="int8"))
    >>> layer(jnp.array([1, 2, 3])).shape, layer.attend(jnp.ones((2, 64))).shape
    ((3, 64), (2, 512))
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        embedding_init=default_embed_init,
        promote_dtype=nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        embedding_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        self.embedding = _kernel_var(
            embedding_init(rngs.params(), (num_embeddings, features), param_dtype), embedding_metadata
        )
        self.num_embeddings, self.features = num_embeddings, features
        self.dtype = dtype or self.embedding.get_value().dtype
        self.param_dtype, self.promote_dtype = param_dtype, promote_dtype

    def _table(self) -> Any:
        table = _value(self.embedding)
        if isinstance(table, CompressedTensor):
            where = f"CompressedEmbed({self.num_embeddings}, {self.features})"
            _layers.check_unbatched(table, where)
            if tuple(table.shape) != (self.num_embeddings, self.features):
                raise ValueError(
                    f"{where}: compressed embedding shape={table.shape} does not match "
                    f"(num_embeddings, features)={(self.num_embeddings, self.features)}"
                )
        return table

    def __call__(self, inputs: Array, out_sharding=None) -> Array:
        table = self._table()
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        if not isinstance(table, CompressedTensor):
            return nnx.Embed.__call__(self, inputs, out_sharding)
        (stand_in,) = self.promote_dtype((_stand_in(table),), dtype=self.dtype, inexact=False)
        with jax.named_scope("ltjax.nnx.embed"):
            if self.num_embeddings == 1:
                row = _layers.take_rows(table, jnp.zeros((), jnp.int32), stand_in.dtype)
                y = jnp.broadcast_to(row, inputs.shape + (self.features,))
            else:
                y = _layers.take_rows(table, inputs, stand_in.dtype)
        return _layers.out_sharded(y, out_sharding)

    def attend(self, query: Array, out_sharding=None) -> Array:
        table = self._table()
        if not isinstance(table, CompressedTensor):
            return nnx.Embed.attend(self, query, out_sharding)
        query, stand_in = self.promote_dtype((query, _stand_in(table)), dtype=self.dtype)
        with jax.named_scope("ltjax.nnx.attend"):
            return _layers.out_sharded(_layers.attend(query, table, dtype=stand_in.dtype), out_sharding)


# ---------------------------------------------------------------------- graph surgery
_TWINS = {
    nnx.Linear: CompressedLinear,
    nnx.LinearGeneral: CompressedLinearGeneral,
    nnx.Einsum: CompressedEinsum,
    nnx.Embed: CompressedEmbed,
}
_SOURCES = tuple(_TWINS) + tuple(_TWINS.values())


def _twin(m) -> type:
    return next(t for s, t in _TWINS.items() if isinstance(m, (s, t)))


def _path(keys: tuple) -> str:
    return "/".join(str(k) for k in keys)


def _kernel_name(m) -> str:
    return "embedding" if _twin(m) is CompressedEmbed else "kernel"


def _stored_layout(m) -> _layout.Layout | None:
    """The ``[K, N]`` matmul layout a kernel is stored in (None: keep its shape)."""
    twin = _twin(m)
    if twin is CompressedLinearGeneral and not m.batch_axis:
        n = len(m.kernel.shape)
        return _layout.Layout(tuple(range(n)), n - len(m.out_features))
    if twin is CompressedEinsum:
        lhs = m.einsum_str.replace(" ", "").split(",")[0]
        c, _ = _layout.einsum_contraction(m.einsum_str, len(lhs.replace("...", "")), len(m.kernel_shape))
        if c is not None and c.layout.matmul_shape(m.kernel_shape) != tuple(m.kernel_shape):
            return c.layout
    return None


def _replacement(m, value, layout) -> nnx.Module:
    """A compressed twin of ``m`` sharing its bias and attributes, holding ``value`` as its kernel.

    Built with ``nnx.eval_shape`` so no throw-away kernel is allocated.
    """
    twin = _twin(m)
    var = CompressedParam(value)
    if twin is CompressedEmbed:
        new = nnx.eval_shape(lambda: CompressedEmbed(1, 1, rngs=nnx.Rngs(0)))
        new.embedding = var
        new.num_embeddings, new.features, new.dtype = m.num_embeddings, m.features, m.dtype
        new.param_dtype, new.promote_dtype = m.param_dtype, m.promote_dtype
        return new
    if twin is CompressedEinsum:
        new = nnx.eval_shape(lambda: CompressedEinsum("i,ij->j", (1, 1), rngs=nnx.Rngs(0)))
        new._adopt(m, var)
        new.kernel_layout = layout
        return new
    new = nnx.eval_shape(lambda: twin(1, 1, rngs=nnx.Rngs(0)))
    new._adopt(m, var)
    return new


def compress_model(model: nnx.Module, policy: Policy | None = None, *,
                   calibration: Mapping[str, InputStats] | None = None) -> CompressionReport:
    """Compresses the kernels of ``model``'s ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` / ``Embed`` in place.

    Each selected layer (found anywhere in the graph, including inside ``nnx.List``,
    ``nnx.Sequential`` and ``nnx.MultiHeadAttention``) is replaced by its `CompressedLinear` /
    `CompressedLinearGeneral` / `CompressedEinsum` / `CompressedEmbed` twin, which keeps the
    layer's bias (a trainable ``nnx.Param``) and holds the compressed kernel in a
    `CompressedParam`. N-D kernels are stored as the ``[K, N]`` matmul kernel their layer
    contracts (``LinearGeneral`` without batch axes: ``[prod(in), prod(out)]``; an ``Einsum``
    that is a matmul: transposed to contracted-then-features and flattened), so every call is
    one `ltjax.matmul`. Layers the policy skips, layers with a custom ``dot_general`` /
    ``einsum_op``, and kernels that cannot be compressed stay as they are (the report says why).

    Args:
      model: the nnx model, modified in place.
      policy: the `ltjax.Policy` (default ``Policy()``); paths are ``a/0/kernel`` strings. With
        ``max_bytes`` / ``bits`` the kernels are planned by `ltjax.plan` (``max_bytes`` then
        counts the kernels found here, ``bits`` averages over those the policy selects).
      calibration: `calibration_stats`' ``{path: ltjax.InputStats}``: int4 kernels with
        statistics are quantized by GPTQ.

    Returns:
      The `ltjax.CompressionReport` of the kernels (``unmatched_skip`` lists skip patterns
      that matched no kernel).
    """
    policy = Policy() if policy is None else policy
    found = [(keys, node) for keys, node in nnx.iter_graph(model) if isinstance(node, _SOURCES) and keys]
    if isinstance(model, _SOURCES):
        found.append(((), model))
    kernels, layouts, held = {}, {}, []
    for keys, m in found:
        path = _path(keys + (_kernel_name(m),))
        value = getattr(m, _kernel_name(m)).get_value()
        if not isinstance(value, CompressedTensor) and _custom_op(m):
            nb = int(value.nbytes)
            held.append(LeafReport(path, tuple(value.shape), str(value.dtype), "dense", nb, nb, None, _custom_op(m)))
            continue
        layout = None if isinstance(value, CompressedTensor) else _stored_layout(m)
        layouts[path] = layout
        kernels[path] = value if layout is None else layout.to_matmul(np.asarray(value))
    compressed, report = compress_tree(kernels, policy, calibration=calibration, return_report=True)
    for keys, m in found:
        path = _path(keys + (_kernel_name(m),))
        value = compressed.get(path)
        if not isinstance(value, CompressedTensor):
            continue
        if not keys:  # the model itself is the layer: only our own classes can take the kernel in place
            if not isinstance(model, tuple(_TWINS.values())):
                raise ValueError(
                    f"compress_model cannot replace the root module itself ({type(model).__name__}); "
                    "use CompressedLinear / CompressedLinearGeneral / CompressedEinsum / CompressedEmbed, or a "
                    "container around it"
                )
            setattr(model, _kernel_name(model), CompressedParam(value))
            if isinstance(model, CompressedEinsum) and layouts[path] is not None:
                model.kernel_layout = layouts[path]
            continue
        parent = model
        for k in keys[:-1]:
            parent = parent[k] if isinstance(k, int) else getattr(parent, k)
        new = _replacement(m, value, layouts[path])
        if isinstance(keys[-1], int):
            parent[keys[-1]] = new
        else:
            setattr(parent, keys[-1], new)
    return CompressionReport(report.leaves + tuple(held), report.unmatched_skip) if held else report


_CALIBRATED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
_MARK = "_ltjax_calibration_path"  # a static attribute: it survives nnx.jit's split and merge


def calibration_stats(model: nnx.Module, batches, *, fn=None, progress: bool | None = None) -> dict[str, InputStats]:
    """The input statistics GPTQ needs, per kernel of an nnx model: ``{path: ltjax.InputStats}``.

    Calls ``fn(model, batch)`` for each batch (default: ``model(*batch)``, or ``model(batch)``
    for a non-tuple batch); ``fn`` may be an ``nnx.jit`` function. Meanwhile every
    ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` of the model (each marked with its path,
    and the classes' ``__call__`` wrapped for the duration) sends ``X^T X`` of its inputs, seen
    as the ``[M, K]`` matmul `compress_model` stores its kernel for, to the host by an ordered
    ``io_callback`` (summed in float64: K x K per kernel). Paths are `compress_model`'s; pass
    the result as its ``calibration=``.
    """
    from jax.experimental import io_callback

    found = [(keys, m) for keys, m in nnx.iter_graph(model) if isinstance(m, _CALIBRATED) and keys]
    if isinstance(model, _CALIBRATED):
        found.append(((), model))
    batches = list(batches)
    if not batches:
        raise ValueError("calibration_stats: no batches")
    xtx: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}

    def host(path: str, m: int, value) -> None:
        v = np.asarray(value, np.float64)
        xtx[path] = v if path not in xtx else xtx[path] + v
        count[path] = count.get(path, 0) + m

    def wrap(cls):
        orig = cls.__call__

        def call(self, inputs, *a, **kw):
            path = getattr(self, _MARK, None)
            x2 = None if path is None else _matmul_inputs(self, inputs, a, kw)
            if x2 is not None:
                x2 = x2.astype(jnp.float32)
                v = jnp.matmul(x2.T, x2, precision=lax.Precision.HIGHEST)
                io_callback(lambda v, p=path, n=x2.shape[0]: host(p, n, v), None, v, ordered=True)
            return orig(self, inputs, *a, **kw)

        return orig, call

    fn = fn or (lambda m, b: m(*b) if isinstance(b, tuple) else m(b))
    patched = {cls: wrap(cls) for cls in _CALIBRATED}
    nbytes = lambda b: sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(b))
    try:
        for keys, m in found:
            object.__setattr__(m, _MARK, _path(keys + ("kernel",)))
        for cls, (_, call) in patched.items():
            cls.__call__ = call
        with Progress("ltjax.calibration_stats", sum(nbytes(b) for b in batches), len(batches), progress) as bar:
            for i, batch in enumerate(batches):
                bar.at(f"batch {i + 1}/{len(batches)}")
                jax.block_until_ready(fn(model, batch))
                jax.effects_barrier()
                bar.step(nbytes(batch))
    finally:
        for cls, (orig, _) in patched.items():
            cls.__call__ = orig
        for _, m in found:
            if _MARK in vars(m):
                object.__delattr__(m, _MARK)
    if not xtx and found:
        raise ValueError("calibration_stats: no layer inputs were recorded; a function jitted before this call keeps "
                         "its old trace: pass fn= a function traced here (or the plain model call)")
    return {p: InputStats(v, count[p]) for p, v in xtx.items()}


def _matmul_inputs(m, inputs, a, kw):
    """An nnx Linear / LinearGeneral / Einsum call's inputs as its matmul's ``[M, K]`` (None: not one matmul)."""
    if isinstance(m, nnx.Linear):
        return jnp.reshape(inputs, (-1, inputs.shape[-1]))
    if isinstance(m, nnx.LinearGeneral):
        if m.batch_axis:
            return None
        axis = tuple(int(i) % inputs.ndim for i in m.axis)
        c = _layout.dense_general_contraction(inputs.ndim, len(m.kernel.shape), axis, ())
    else:
        eq = (a[0] if a else kw.get("einsum_str")) or m.einsum_str
        c, _ = _layout.einsum_contraction(eq, inputs.ndim, len(m.kernel_shape))
    return None if c is None else _layout.contraction_inputs(inputs, c)


def index_rows(model: nnx.Module) -> nnx.Module:
    """`ltjax.index_rows` for an nnx model, in place: every bitmask `CompressedParam` carries its
    row starts, which the GPU kernels read instead of counting them from the mask in every call.
    Returns ``model``."""
    from ltjax._format import index_rows as index_tree

    nnx.update(model, index_tree(nnx.state(model, CompressedParam)))
    return model
