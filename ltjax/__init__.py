"""ltjax: compressed tensors that JAX programs compute on directly."""

__version__ = "0.1.0"
