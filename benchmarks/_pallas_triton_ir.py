"""Dumps the Triton IR of every ltjax Pallas kernel at the tuned block sizes (no GPU needed).

Usage (project venv):  python benchmarks/_pallas_triton_ir.py build/ttir [--sweep]
then:                  ../shared/tools/triton-offline-check build/ttir --cc 90 80 --json out.json
Shapes: a 4096 x 4096 Dense kernel (default 256 x 256 tiles), M = 1, 4, 16, 64, 128, bf16 and f32.
``--sweep``: instead, every Triton candidate of `benchmarks.pallas_sweep` (a 2048 x 2048 weight:
the compile does not depend on the size), to drop the ones that spill before a GPU times them.
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


def sweep_candidates(outdir: str, size: int = 2048) -> None:
    from benchmarks.matmul import make_weight
    from benchmarks.pallas_sweep import CANDIDATES, UNPACK

    rng = np.random.default_rng(0)
    os.makedirs(outdir, exist_ok=True)
    cts = {}
    for (kernel, codec, sparsity, m, xdt), cands in CANDIDATES.items():
        if (codec, sparsity) not in cts:
            cts[(codec, sparsity)] = pack(make_weight(rng, size, size, sparsity), codec)
        ct = cts[(codec, sparsity)]
        for bs in cands:
            if not isinstance(bs, lp.BlockSizes) or bs.mosaic is not None:
                continue  # the tuned row (dumped by `main`) or a Mosaic GPU one (not Triton)
            label = (f"{kernel}_m{m}_{xdt}_{bs.block_m}_{bs.block_n}_{bs.block_k}_s{bs.split}_w{bs.num_warps}"
                     f"_st{bs.num_stages}{'_swap' if bs.swap_ab else ''}_b{bs.band_rows}")
            with toc.capture() as kernels:
                if kernel in UNPACK:
                    fn, transposed = UNPACK[kernel]
                    f = functools.partial(fn, interpret=False, transposed=transposed, block_sizes=bs)
                    jax.jit(f).trace(ct).lower(lowering_platforms=("cuda",))
                else:
                    op = lp.matmul_t if kernel.endswith("_t") else lp.matmul
                    x = jax.ShapeDtypeStruct((max(m, 1), size), jnp.dtype(xdt))
                    jax.jit(functools.partial(op, interpret=False, block_sizes=bs)).trace(x, ct).lower(
                        lowering_platforms=("cuda",))
            for r in kernels:
                r["name"] = f"{r['name']}__{label}"
            toc.write_kernels(kernels, outdir)
            print(label, [r["name"].split("__")[0] for r in kernels])


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--sweep"]
    (sweep_candidates if "--sweep" in sys.argv[1:] else main)(args[0] if args else "build/ttir")
