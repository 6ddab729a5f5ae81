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

from types import MappingProxyType
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from flax.nnx.nn.linear import default_embed_init, default_kernel_init
from flax.nnx.nn.linear import default_bias_init

from ltjax import _layers
from ltjax._activation_modules import NnxCompressedReLU as CompressedReLU
from ltjax._activation_modules import SparseLinear
from ltjax._analyze import CompressionReport, Policy, compress_tree
from ltjax._format import CompressedTensor

__all__ = [
    "CompressedReLU",
    "SparseLinear",
    "CompressedEmbed",
    "CompressedLinear",
    "CompressedLinearGeneral",
    "CompressedParam",
    "compress_model",
    "index_rows",
]

Array = jax.Array


class CompressedParam(nnx.Variable):
    """An ``nnx.Variable`` holding a `CompressedTensor` (frozen: not an ``nnx.Param``)."""


def _value(v):
    return None if v is None else v.get_value()


def _kernel_var(value, metadata) -> nnx.Variable:
    return CompressedParam(value, **metadata) if isinstance(value, CompressedTensor) else nnx.Param(value, **metadata)


def _stand_in(ct: CompressedTensor) -> Array:
    return jnp.zeros((0,), ct.dtype)


class CompressedLinear(nnx.Module):
    """``flax.nnx.Linear`` whose kernel may be a `CompressedTensor` (in a `CompressedParam`).

    Constructed like ``nnx.Linear`` (a dense ``nnx.Param`` kernel); `compress_model` or
    `from_module` turns the kernel into a `CompressedParam`. Computes ``ltjax.matmul(x, W) + b``
    with flax's dtype promotion; ``precision`` applies to the matmul.

    Args:
      in_features: the number of input features.
      out_features: the number of output features.
      use_bias: whether to add a bias to the output (default: True).
      dtype: the dtype of the computation (default: infer from input and params).
      param_dtype: the dtype passed to parameter initializers (default: float32).
      precision: numerical precision of the computation, see ``jax.lax.Precision``.
      kernel_init: initializer function for the weight matrix.
      bias_init: initializer function for the bias.
      promote_dtype: promotes ``(inputs, kernel, bias)`` to one dtype.
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
        promote_dtype=nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        self.kernel = _kernel_var(kernel_init(rngs.params(), (in_features, out_features), param_dtype), kernel_metadata)
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype), **bias_metadata)
            if use_bias
            else nnx.data(None)
        )
        self.in_features, self.out_features, self.use_bias = in_features, out_features, use_bias
        self.dtype, self.param_dtype, self.precision, self.promote_dtype = dtype, param_dtype, precision, promote_dtype

    def __call__(self, inputs: Array) -> Array:
        kernel, bias = _value(self.kernel), _value(self.bias)
        if not isinstance(kernel, CompressedTensor):
            inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
            with _layers.matmul_precision(self.precision):
                y = jnp.matmul(inputs, kernel)
            return y if bias is None else y + bias
        where = f"CompressedLinear({self.in_features}, {self.out_features})"
        _layers.check_unbatched(kernel, where)
        if tuple(kernel.shape) != (inputs.shape[-1], self.out_features):
            raise ValueError(
                f"{where}: compressed kernel shape={kernel.shape} does not match "
                f"(in_features, out_features)={(inputs.shape[-1], self.out_features)}"
            )
        inputs, stand_in, bias = self.promote_dtype((inputs, _stand_in(kernel), bias), dtype=self.dtype)
        with jax.named_scope("ltjax.nnx.linear"):
            return _layers.linear(inputs, kernel, bias, dtype=stand_in.dtype, precision=self.precision)


class CompressedLinearGeneral(nnx.Module):
    """``flax.nnx.LinearGeneral`` whose kernel may be a `CompressedTensor`.

    The contraction is one `ltjax.matmul` when the kernel is stored as a ``[K, N]`` matmul
    kernel (`compress_model` stores it flattened to ``[prod(in), prod(out)]``); kernels with
    ``batch_axis`` are decompressed before the contraction (logged once).

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
        batch_axis: Mapping[int, int] = MappingProxyType({}),
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init=default_kernel_init,
        bias_init=default_bias_init,
        precision: Any = None,
        promote_dtype=nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        dense = nnx.LinearGeneral(
            in_features,
            out_features,
            axis=axis,
            batch_axis=batch_axis,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            precision=precision,
            promote_dtype=promote_dtype,
            rngs=rngs,
            kernel_metadata=kernel_metadata,
            bias_metadata=bias_metadata,
        )
        self._adopt(dense, dense.kernel)

    def _adopt(self, m: nnx.LinearGeneral, kernel: nnx.Variable) -> None:
        self.in_features, self.out_features, self.axis = m.in_features, m.out_features, m.axis
        self.batch_axis, self.use_bias, self.dtype = m.batch_axis, m.use_bias, m.dtype
        self.param_dtype, self.precision, self.promote_dtype = m.param_dtype, m.precision, m.promote_dtype
        self.kernel, self.bias = kernel, nnx.data(m.bias)

    def __call__(self, inputs: Array) -> Array:
        kernel, bias = _value(self.kernel), _value(self.bias)
        batch_dims = tuple(self.batch_axis.keys())
        axis = tuple(a % inputs.ndim for a in self.axis)
        if not isinstance(kernel, CompressedTensor):
            inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
            nb = len(batch_dims)
            with _layers.matmul_precision(self.precision):
                y = jax.lax.dot_general(inputs, kernel, ((axis, tuple(range(nb, nb + len(axis)))), (batch_dims, tuple(range(nb)))))
        else:
            where = f"CompressedLinearGeneral({self.in_features}, {self.out_features})"
            _layers.check_unbatched(kernel, where)
            inputs, stand_in, bias = self.promote_dtype((inputs, _stand_in(kernel), bias), dtype=self.dtype)
            with jax.named_scope("ltjax.nnx.linear_general"):
                y = _layers.general_dot(
                    inputs, kernel, axis=axis, batch_dims=batch_dims, features=self.out_features,
                    dtype=stand_in.dtype, precision=self.precision, where=where,
                )
        if bias is not None:
            expanded = tuple(inputs.shape[a] if a in batch_dims else 1 for a in range(inputs.ndim) if a not in axis)
            y = y + jnp.reshape(bias, expanded + tuple(self.out_features))
        return y


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

    def __call__(self, inputs: Array) -> Array:
        table = self._table()
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        if not isinstance(table, CompressedTensor):
            (table,) = self.promote_dtype((table,), dtype=self.dtype, inexact=False)
            if self.num_embeddings == 1:
                return jnp.broadcast_to(table, inputs.shape + (self.features,))
            return jnp.take(table, inputs, axis=0)
        (stand_in,) = self.promote_dtype((_stand_in(table),), dtype=self.dtype, inexact=False)
        with jax.named_scope("ltjax.nnx.embed"):
            if self.num_embeddings == 1:
                row = _layers.take_rows(table, jnp.zeros((), jnp.int32), stand_in.dtype)
                return jnp.broadcast_to(row, inputs.shape + (self.features,))
            return _layers.take_rows(table, inputs, stand_in.dtype)

    def attend(self, query: Array) -> Array:
        table = self._table()
        if not isinstance(table, CompressedTensor):
            query, table = self.promote_dtype((query, table), dtype=self.dtype)
            return jnp.dot(query, table.T)
        query, stand_in = self.promote_dtype((query, _stand_in(table)), dtype=self.dtype)
        with jax.named_scope("ltjax.nnx.attend"):
            return _layers.attend(query, table, dtype=stand_in.dtype)


# ---------------------------------------------------------------------- graph surgery
_SOURCES = (nnx.Linear, nnx.LinearGeneral, nnx.Embed, CompressedLinear, CompressedLinearGeneral, CompressedEmbed)


def _path(keys: tuple) -> str:
    return "/".join(str(k) for k in keys)


def _dense_kernel(m) -> tuple[str, Any]:
    name = "embedding" if isinstance(m, (nnx.Embed, CompressedEmbed)) else "kernel"
    return name, getattr(m, name)


def _flat_shape(m) -> tuple[int, int] | None:
    """The 2-D matmul shape a LinearGeneral kernel is stored in (None: keep it N-D)."""
    if isinstance(m, (nnx.LinearGeneral, CompressedLinearGeneral)) and not m.batch_axis:
        k = int(jnp.prod(jnp.array(m.in_features)))
        return k, int(jnp.prod(jnp.array(m.out_features)))
    return None


def _replacement(m, value) -> nnx.Module:
    """A compressed twin of ``m`` sharing its bias and attributes, holding ``value`` as its kernel.

    Built with ``nnx.eval_shape`` so no throw-away kernel is allocated.
    """
    var = CompressedParam(value)
    if isinstance(m, (nnx.Linear, CompressedLinear)):
        new = nnx.eval_shape(lambda: CompressedLinear(1, 1, rngs=nnx.Rngs(0)))
        new.kernel, new.bias = var, nnx.data(m.bias)
        new.in_features, new.out_features, new.use_bias = m.in_features, m.out_features, m.use_bias
        new.dtype, new.param_dtype, new.precision, new.promote_dtype = m.dtype, m.param_dtype, m.precision, m.promote_dtype
    elif isinstance(m, (nnx.LinearGeneral, CompressedLinearGeneral)):
        new = nnx.eval_shape(lambda: CompressedLinearGeneral(1, 1, rngs=nnx.Rngs(0)))
        new._adopt(m, var)
    else:
        new = nnx.eval_shape(lambda: CompressedEmbed(1, 1, rngs=nnx.Rngs(0)))
        new.embedding = var
        new.num_embeddings, new.features, new.dtype = m.num_embeddings, m.features, m.dtype
        new.param_dtype, new.promote_dtype = m.param_dtype, m.promote_dtype
    return new


def compress_model(model: nnx.Module, policy: Policy | None = None) -> CompressionReport:
    """Compresses the kernels of ``model``'s ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Embed`` in place.

    Each selected layer (found anywhere in the graph, including inside ``nnx.List`` and
    ``nnx.Sequential``) is replaced by its `CompressedLinear` / `CompressedLinearGeneral` /
    `CompressedEmbed` twin, which keeps the layer's bias (a trainable ``nnx.Param``) and
    holds the compressed kernel in a `CompressedParam`. ``LinearGeneral`` kernels without
    batch axes are stored flattened as ``[prod(in), prod(out)]`` matmul kernels. Layers the
    policy skips, or whose kernel cannot be compressed, stay as they are.

    Args:
      model: the nnx model, modified in place.
      policy: the `ltjax.Policy` (default ``Policy()``); paths are ``a/0/kernel`` strings.

    Returns:
      The `ltjax.CompressionReport` of the kernels (``unmatched_skip`` lists skip patterns
      that matched no kernel).
    """
    policy = Policy() if policy is None else policy
    found = [(keys, node) for keys, node in nnx.iter_graph(model) if isinstance(node, _SOURCES) and keys]
    if isinstance(model, _SOURCES):
        found.append(((), model))
    kernels = {}
    for keys, m in found:
        name, var = _dense_kernel(m)
        value = var.get_value()
        if isinstance(value, CompressedTensor):
            kernels[_path(keys + (name,))] = value
            continue
        flat = _flat_shape(m)
        kernels[_path(keys + (name,))] = value.reshape(flat) if flat else value
    compressed, report = compress_tree(kernels, policy, return_report=True)
    for keys, m in found:
        value = compressed[_path(keys + (_dense_kernel(m)[0],))]
        if not isinstance(value, CompressedTensor):
            continue
        if not keys:  # the model itself is the layer: only our own classes can take the kernel in place
            if not isinstance(model, (CompressedLinear, CompressedLinearGeneral, CompressedEmbed)):
                raise ValueError(
                    f"compress_model cannot replace the root module itself ({type(model).__name__}); "
                    "use CompressedLinear / CompressedLinearGeneral / CompressedEmbed, or a container around it"
                )
            setattr(model, _dense_kernel(model)[0], CompressedParam(value))
            continue
        parent = model
        for k in keys[:-1]:
            parent = parent[k] if isinstance(k, int) else getattr(parent, k)
        new = _replacement(m, value)
        if isinstance(keys[-1], int):
            parent[keys[-1]] = new
        else:
            setattr(parent, keys[-1], new)
    return report


def index_rows(model: nnx.Module) -> nnx.Module:
    """`ltjax.index_rows` for an nnx model, in place: every bitmask `CompressedParam` carries its
    row starts, which the GPU kernels read instead of counting them from the mask in every call.
    Returns ``model``."""
    from ltjax._format import index_rows as index_tree

    nnx.update(model, index_tree(nnx.state(model, CompressedParam)))
    return model
