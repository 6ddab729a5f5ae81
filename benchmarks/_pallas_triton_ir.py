"""Dumps the Triton IR of every ltjax Pallas kernel at the tuned block sizes (no GPU needed).

Usage (project venv):  python benchmarks/_pallas_triton_ir.py build/ttir [--sweep [--size N] [--only P ...]]
then:                  ../shared/tools/triton-offline-check build/ttir --cc 90 80 --json out.json
and optionally:        python benchmarks/_pallas_triton_ir.py --occupancy out.json [occupancy.json]
Shapes: a 4096 x 4096 Dense kernel (default 256 x 256 tiles), M = 1, 4, 16, 64, 128, bf16 and f32.
``--sweep``: instead, every Triton candidate of `benchmarks.pallas_sweep` (a 2048 x 2048 weight by
default, ``--size`` to change; ``--only`` as the sweep's), to drop the ones that spill before a GPU
times them. ``--occupancy``: from a check's JSON (sm_90 rows), how many programs of each kernel an
H100/H200 SM holds and how many the grid gives it (`occupancy`).
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ltjax import pallas as lp
from ltjax._format import pack


def _toc():
    """The offline-check helpers (`../shared/tools/triton_offline_check.py`, beside the checkout)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "tools"))
    import triton_offline_check

    return triton_offline_check


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
                continue  # the tuned row (dumped by `main`) or a Mosaic GPU one (not Triton)
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


# Hopper (sm_90) per-SM limits, and the SM count of an H100 / H200 SXM.
SM90 = dict(regs=65536, warps=64, blocks=32, shared=228 * 1024, sms=132)


def occupancy(regs: int, num_warps: int, shared: int, programs: int, hw: dict = SM90) -> dict:
    """Programs of one kernel an SM holds at once (registers allocated per warp in units of 256, the
    tightest of the register, warp, block and shared-memory limits), and what a grid of ``programs``
    gives each SM: resident warps, and waves (``programs`` over what all SMs hold at once)."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = dict(regs=hw["regs"] // (regs_per_warp * num_warps), warps=hw["warps"] // num_warps,
                  blocks=hw["blocks"], shared=hw["shared"] // shared if shared else hw["blocks"])
    per_sm = min(limits.values())
    resident = min(per_sm, -(-programs // hw["sms"]))
    return dict(programs_per_sm=per_sm, limited_by=min(limits, key=limits.get), programs=programs,
                warps_per_sm=resident * num_warps, waves=programs / (per_sm * hw["sms"]) if per_sm else float("inf"))


def occupancy_table(check_json: str, out_json: str | None = None) -> list[dict]:
    import json

    with open(check_json) as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "regs" in r for r in rows):
        raise SystemExit(f"{check_json}: not a triton-offline-check --json output (a list of kernel rows with 'regs')")
    out = []
    for r in rows:
        if r.get("cc") != 90 or r.get("status") != "OK":
            continue
        programs = int(np.prod(r["grid"]))
        out.append(dict(kernel=r["kernel"], regs=r["regs"], num_warps=r["num_warps"], shared=r["shared"],
                        **occupancy(r["regs"], r["num_warps"], r["shared"], programs)))
    for o in out:
        print(f"{o['kernel'][:100]:<100} regs {o['regs']:>3} w{o['num_warps']} {o['programs_per_sm']:>2}/SM "
              f"({o['limited_by']:>6}) grid {o['programs']:>6} -> {o['warps_per_sm']:>2} warps/SM, {o['waves']:.2f} waves")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(dict(source=os.path.basename(check_json), limits=SM90, rows=out), f, indent=1)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", nargs="?", default="build/ttir", help="where the IR goes")
    ap.add_argument("--sweep", action="store_true", help="the sweep's Triton candidates instead of the tuned rows")
    ap.add_argument("--size", type=int, default=2048, help="K = N of the --sweep weight")
    ap.add_argument("--only", nargs="+", default=(), metavar="PREFIX", help="--sweep groups, as pallas_sweep's")
    ap.add_argument("--occupancy", nargs="+", metavar=("CHECK_JSON", "OUT_JSON"),
                    help="print (and write) the occupancy of a check's sm_90 kernels; nothing is dumped")
    a = ap.parse_args()
    if a.occupancy:
        occupancy_table(a.occupancy[0], a.occupancy[1] if len(a.occupancy) > 1 else None)
    elif a.sweep:
        sweep_candidates(a.outdir, a.size, tuple(a.only))
    else:
        main(a.outdir)
