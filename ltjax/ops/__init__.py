"""The public op layer: one package per op (public function, its one VJP, its reference, and an
ordered registry of implementations, one module each), on one shared registry walk (`_dispatch`).

    ltjax/ops/matmul/      api.py (matmul, explain, the VJP, the registries), reference.py, xla.py,
                           pallas.py -> ltjax/pallas, cpu.py -> ltjax/ffi/cpu, cuda.py -> ltjax/ffi/cuda
    ltjax/ops/decompress/  api.py, reference.py, xla.py, pallas.py, cpu.py
    ltjax/ops/residual/    api.py (bit packing of training residuals), reference.py, pallas.py

A new codec adds its branch inside the implementations that support it; a new backend adds one
module per op it serves and one line in that op's registry.
"""

from ltjax.ops.decompress import decompress, decompress_reference
from ltjax.ops.matmul import explain, matmul, matmul_impl, matmul_reference

__all__ = ["decompress", "decompress_reference", "explain", "matmul", "matmul_impl", "matmul_reference"]
