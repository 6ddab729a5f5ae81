"""The public op layer: one package per op (public function, its one VJP, its reference, and an
ordered registry of implementations, one module each), on one shared registry walk (`_dispatch`).

    ltjax/ops/matmul/      api.py (matmul, explain, the VJP, the registries), reference.py, xla.py,
                           pallas.py -> ltjax/pallas, cpu.py -> ltjax/ffi/cpu, cuda.py -> ltjax/ffi/cuda
    ltjax/ops/decompress/  api.py, reference.py, xla.py, pallas.py, cpu.py
    ltjax/ops/residual/    api.py (bit packing of training residuals), reference.py, pallas.py

A new codec adds its branch inside the implementations that support it; a new backend adds one
module per op it serves and one line in that op's registry. The public functions are
`ltjax.matmul`, `ltjax.explain`, `ltjax.decompress` and the references; this package re-exports
nothing, so ``ltjax.ops.matmul`` is always the package.
"""
