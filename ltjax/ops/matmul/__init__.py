"""`ltjax.matmul`: public function, `explain`, the VJP and the registry in `api`; one module per implementation."""

from ltjax.ops.matmul.api import IMPLEMENTATIONS, TRANSPOSES, explain, matmul, matmul_impl
from ltjax.ops.matmul.reference import matmul_reference

__all__ = ["IMPLEMENTATIONS", "TRANSPOSES", "explain", "matmul", "matmul_impl", "matmul_reference"]
