"""Dumps the Triton IR of every ltjax Pallas kernel at the tuned block sizes (no GPU needed).

Usage (project venv):  python benchmarks/_pallas_triton_ir.py build/ttir
then:                  ../shared/tools/triton-offline-check build/ttir --cc 90 80 --json out.json
Shapes: a 4096 x 4096 Dense kernel (default 256 x 256 tiles), M = 1, 4, 16, 64, 128, bf16 and f32.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "tools"))
sys.path.insert(0, "/work/shared/tools")
import triton_offline_check as toc  # noqa: E402

from ltjax import pallas as lp  # noqa: E402
from ltjax._format import pack  # noqa: E402


def main(outdir: str, k: int = 4096, n: int = 4096) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.random((k, n)) < 0.5] = 0
    cases = []
    for codec in ("int8", "bitmask_int8", "bitmask"):
        ct = pack(w if codec != "bitmask" else w.astype(jnp.bfloat16), codec)
        for m in (1, 4, 16, 64, 128):
            for dt in ((jnp.bfloat16, jnp.float32) if m in (1, 16, 64, 128) else (jnp.bfloat16,)):
                cases.append((f"{codec}_m{m}_{jnp.dtype(dt).name}_matmul", lp.matmul, (m, k), dt, ct))
                cases.append((f"{codec}_m{m}_{jnp.dtype(dt).name}_matmul_t", lp.matmul_t, (m, n), dt, ct))
        cases.append((f"{codec}_decompress", None, None, None, ct))
    os.makedirs(outdir, exist_ok=True)
    for label, fn, shape, dt, ct in cases:
        with toc.capture() as kernels:
            if fn is None:
                jax.jit(functools.partial(lp.decompress, interpret=False)).trace(ct).lower(
                    lowering_platforms=("cuda",))
            else:
                x = jax.ShapeDtypeStruct(shape, dt)
                jax.jit(functools.partial(fn, interpret=False)).trace(x, ct).lower(lowering_platforms=("cuda",))
        for r in kernels:
            r["name"] = f"{r['name']}__{label}"
        toc.write_kernels(kernels, outdir)
        print(f"{label}: {[r['name'] for r in kernels]} grid={[r['grid'] for r in kernels]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/ttir")
