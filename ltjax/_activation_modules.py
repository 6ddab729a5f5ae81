"""Flax modules (linen and nnx) for compressed activation residuals."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn, nnx

from ltjax import _activations as _act

Dtype = Any
Initializer = Any

default_kernel_init = nn.initializers.lecun_normal()
default_bias_init = nn.initializers.zeros_init()


# --------------------------------------------------------------------------------------
# linen
# --------------------------------------------------------------------------------------


class CompressedReLU(nn.Module):
    """ReLU whose backward keeps a 1-bit sign mask (linen). No parameters.

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from ltjax._activation_modules import CompressedReLU
    >>> CompressedReLU().apply({}, jnp.array([-1.0, 2.0]))
    Array([0., 2.], dtype=float32)
    """

    @nn.compact
    def __call__(self, x):
        return _act.relu(x)


class SparseDense(nn.Module):
    """``flax.linen.Dense`` whose saved input is bitmask-compressed for the backward.

    Same parameters (``kernel [K, N]``, ``bias [N]``) and initialisers as
    ``nn.Dense``; forward identical; gradients identical while the input's nonzeros
    fit ``capacity`` (see :func:`ltjax._activations.sparse_dense`).

    Attributes:
      features: number of output features.
      use_bias: whether to add a bias.
      capacity: fraction of the input size kept as packed nonzeros, in (0, 1].
      dtype: computation dtype (inferred from inputs and params when None).
      param_dtype: dtype of the parameters.
      kernel_init: kernel initialiser.
      bias_init: bias initialiser.
    """

    features: int
    use_bias: bool = True
    capacity: float | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = default_bias_init

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(x)[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return _act.sparse_dense(x, kernel, bias, capacity=self.capacity)


# --------------------------------------------------------------------------------------
# nnx
# --------------------------------------------------------------------------------------


class NnxCompressedReLU(nnx.Module):
    """ReLU whose backward keeps a 1-bit sign mask (nnx). No parameters.

    Example:

    >>> import jax.numpy as jnp
    >>> from ltjax._activation_modules import NnxCompressedReLU
    >>> NnxCompressedReLU()(jnp.array([-1.0, 2.0]))
    Array([0., 2.], dtype=float32)
    """

    def __call__(self, x):
        return _act.relu(x)


class SparseLinear(nnx.Module):
    """``flax.nnx.Linear`` whose saved input is bitmask-compressed for the backward.

    Args:
      in_features: input feature count.
      out_features: output feature count.
      use_bias: whether to add a bias.
      capacity: fraction of the input size kept as packed nonzeros, in (0, 1].
      dtype: computation dtype (inferred when None).
      param_dtype: parameter dtype.
      kernel_init: kernel initialiser.
      bias_init: bias initialiser.
      rngs: ``nnx.Rngs`` for initialisation.

    Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from ltjax._activation_modules import SparseLinear
    >>> layer = SparseLinear(3, 2, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((4, 3))).shape
    (4, 2)
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 capacity: float | None = None, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32,
                 kernel_init: Initializer = default_kernel_init,
                 bias_init: Initializer = default_bias_init, rngs: nnx.Rngs):
        if capacity is not None:
            _act._check_capacity(capacity)
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias
        self.capacity = capacity
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features),
                                            param_dtype))
        self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                     if use_bias else None)

    def __call__(self, x):
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return _act.sparse_dense(x, kernel, bias, capacity=self.capacity)
