"""XLA FFI custom calls, one subpackage per platform; neither imports the other.

- `ltjax.ffi.cpu`: the CPU handlers (C++: fused int8 / bitmask matmuls, bitmask unpack), built into
  ``cpu/_ltjax_ffi*.so`` by the install; docs/ffi.md.
- `ltjax.ffi.cuda`: the CUDA small-M kernels (``cuda/_ltjax_cuda.so`` where nvcc works) and their
  CPU emulation for the tests (``cuda/_ltjax_cuda_emulate.so``, a test build only); docs/cuda.md.

`available`, `unavailable_reason` and `info` here are `ltjax.ffi.cpu`'s, under the names the
docs used before the split (kept for one release), looked up on first use so that importing
`ltjax.ffi.cuda` does not load the CPU extension.
"""

from __future__ import annotations

_CPU_ALIASES = ("available", "info", "unavailable_reason")


def __getattr__(name: str):
    if name in _CPU_ALIASES:
        from ltjax.ffi import cpu

        return getattr(cpu, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

