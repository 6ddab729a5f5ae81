"""Dumps the Triton IR of every ltjax Pallas kernel at the tuned block sizes (no GPU needed).

    python -m benchmarks.analysis.triton_ir build/ttir [--sweep] [--size N] [--only PREFIX ...]

then check it offline and, optionally, read the sm_90 occupancy from the check:

    ../shared/tools/triton-offline-check build/ttir --cc 90 80 --json CHECK.json
    python -m benchmarks.analysis.occupancy CHECK.json [OUT.json]

Shapes: a 4096 x 4096 Dense kernel (default 256 x 256 tiles), M = 1, 4, 16, 64, 128, bf16 and f32.
``--sweep``: instead, every Triton candidate of `benchmarks.pallas_sweep` (a 2048 x 2048 weight by
default, ``--size`` to change; ``--only`` as the sweep's), to drop the ones that spill before a GPU
times them.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ltjax import pallas as lp
from ltjax._format import pack


def _toc():
    """The offline-check helpers (`../shared/tools/triton_offline_check.py`, beside the checkout)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "shared" / "tools"))
    import triton_offline_check

    return triton_offline_check


def dump(outdir: str, k: int = 4096, n: int = 4096) -> None:
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
        with _toc().capture() as kernels:
            if fn is None:
                jax.jit(functools.partial(lp.decompress, interpret=False)).trace(ct).lower(
                    lowering_platforms=("cuda",))
            else:
                x = jax.ShapeDtypeStruct(shape, dt)
                jax.jit(functools.partial(fn, interpret=False)).trace(x, ct).lower(lowering_platforms=("cuda",))
        for r in kernels:
            r["name"] = f"{r['name']}__{label}"
        _toc().write_kernels(kernels, outdir)
        print(f"{label}: {[r['name'] for r in kernels]} grid={[r['grid'] for r in kernels]}")


def sweep_candidates(outdir: str, size: int = 2048, only: tuple[str, ...] = ()) -> None:
    from benchmarks.matmul import make_weight
    from benchmarks.pallas_sweep import CANDIDATES, UNPACK

    rng = np.random.default_rng(0)
    os.makedirs(outdir, exist_ok=True)
    cts = {}
    for (kernel, codec, sparsity, m, xdt), cands in CANDIDATES.items():
        if only and not f"{kernel}/{m}/{xdt}".startswith(only):
            continue
        if (codec, sparsity) not in cts:
            cts[(codec, sparsity)] = pack(make_weight(rng, size, size, sparsity), codec)
        ct = cts[(codec, sparsity)]
        for bs in cands:
            if not isinstance(bs, lp.BlockSizes) or bs.mosaic is not None:
                continue  # the tuned row (dumped by `dump`) or a Mosaic GPU one (not Triton)
            label = (f"{kernel}_m{m}_{xdt}_{bs.block_m}_{bs.block_n}_{bs.block_k}_s{bs.split}_w{bs.num_warps}"
                     f"_st{bs.num_stages}{'_swap' if bs.swap_ab else ''}_b{bs.band_rows}")
            with _toc().capture() as kernels:
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
            _toc().write_kernels(kernels, outdir)
            print(label, [r["name"].split("__")[0] for r in kernels])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", nargs="?", default="build/ttir", help="where the IR goes")
    ap.add_argument("--sweep", action="store_true", help="the sweep's Triton candidates instead of the tuned rows")
    ap.add_argument("--size", type=int, default=2048, help="K = N of the --sweep weight")
    ap.add_argument("--only", nargs="+", default=(), metavar="PREFIX", help="--sweep groups, as pallas_sweep's")
    a = ap.parse_args(argv)
    if a.sweep:
        sweep_candidates(a.outdir, a.size, tuple(a.only))
    else:
        dump(a.outdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
