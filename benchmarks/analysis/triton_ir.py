"""Dumps the Triton IR of every ltjax Pallas kernel at the tuned block sizes (no GPU needed).

    python -m benchmarks.analysis.triton_ir build/ttir [--sweep] [--size N] [--only PREFIX ...]

then check it offline and, optionally, read the sm_90 occupancy from the check:

    ../shared/tools/triton-offline-check build/ttir --cc 90 80 --json CHECK.json
    python -m benchmarks.analysis.occupancy CHECK.json [OUT.json]

Shapes: a 4096 x 4096 Dense kernel (default 256 x 256 tiles), M = 1, 4, 16, 64, 128, bf16 and f32.
``--sweep``: instead, every Triton candidate of `benchmarks.pallas_sweep` (a 2048 x 2048 weight by
default, ``--size`` to change; ``--only`` as the sweep's), to drop the ones that spill before a GPU
times them.

``--int4``: instead, the int4 kernels at their tuned rows (`int4_cases`: 8192 x 8192 at M = 1 and 16,
symmetric and asymmetric, groups 32 and 128, bf16 and f32, M = 64 and 128 too for the symmetric
32-column groups, and SmolLM2-135M's MLP shapes), with
``int4_cases.json`` beside the IR (each kernel's block sizes and weights per loop step). After the
offline check has compiled them, ``--sass DIR`` reads its sm_90 cubins back (cuobjdump: on the PATH,
or the one the `triton` package carries) and writes ``DIR/sass_sm90.json``: each kernel's instructions
per main-loop step and per weight decoded (one warp's instructions over the weights a thread handles).
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


def _abstract_int4(k: int, n: int, group: int, asymmetric: bool):
    """A [K, N] Dense kernel's int4 tensor of shapes only: lowering an 8192² weight needs no packing."""
    from ltjax._format import CompressedTensor, Header, choose_tile, expected_arrays

    h = Header("int4", (k, n), "float32", 1, choose_tile((n, k), None), group=group, asymmetric=asymmetric)
    arrays = {f: jax.ShapeDtypeStruct(s, d) for f, (s, d) in expected_arrays(h, None).items()}
    return CompressedTensor(header=h, **arrays)


def int4_cases():
    """(label, op, x shape, x dtype, abstract weight): the int4 kernels' shapes that matter."""
    cases = []
    weights = [("8192_g32", 8192, 8192, 32, False), ("8192_g32_asym", 8192, 8192, 32, True),
               ("8192_g128", 8192, 8192, 128, False), ("576x1536_g32", 576, 1536, 32, False),
               ("1536x576_g32_asym", 1536, 576, 32, True)]
    for name, k, n, g, asym in weights:
        ct = _abstract_int4(k, n, g, asym)
        for m in (1, 16, 64, 128) if name == "8192_g32" else (1, 16):
            for dt in (jnp.bfloat16, jnp.float32):
                tag = f"{name}_m{m}_{jnp.dtype(dt).name}"
                cases.append((f"{tag}_matmul", lp.matmul, (m, k), dt, ct))
                if name.startswith("8192"):
                    cases.append((f"{tag}_matmul_t", lp.matmul_t, (m, n), dt, ct))
        if name.startswith("8192"):
            cases.append((f"{name}_decompress", None, None, None, ct))
    return cases


def dump_int4(outdir: str) -> None:
    import json

    from ltjax.pallas.int4_matmul import F32_AS_BF16_ROWS_MAX_M, _block_sizes

    os.makedirs(outdir, exist_ok=True)
    meta = {}
    for label, fn, shape, dt, ct in int4_cases():
        with _toc().capture() as kernels:
            if fn is None:
                jax.jit(functools.partial(lp.decompress, interpret=False)).trace(ct).lower(
                    lowering_platforms=("cuda",))
                kernel, rows = "int4_dequant_t", 1
            else:
                x = jax.ShapeDtypeStruct(shape, dt)
                jax.jit(functools.partial(fn, interpret=False)).trace(x, ct).lower(lowering_platforms=("cuda",))
                kernel, rows = ("int4_matmul_t" if fn is lp.matmul_t else "int4_matmul"), shape[0]
                if kernel == "int4_matmul" and dt == jnp.float32 and rows <= F32_AS_BF16_ROWS_MAX_M:
                    dt, rows = jnp.bfloat16, 3 * rows  # runs as the bf16 kernel over 3 M rows
        bs = _block_sizes(kernel, jax.ShapeDtypeStruct((rows, 1), dt or jnp.float32), ct, None)
        for r in kernels:
            r["name"] = f"{r['name']}__{label}"
            meta[r["name"]] = dict(kernel=kernel, rows=rows, dtype=jnp.dtype(dt or jnp.float32).name,
                                   group=ct.header.group, asymmetric=ct.header.asymmetric,
                                   block_sizes={f: getattr(bs, f) for f in ("block_m", "block_n", "block_k", "split",
                                                                            "num_warps", "num_stages")},
                                   weights_per_step=bs.block_n * bs.block_k)
        _toc().write_kernels(kernels, outdir)
        print(f"{label}: {[r['name'] for r in kernels]} grid={[r['grid'] for r in kernels]}")
    with open(os.path.join(outdir, "int4_cases.json"), "w") as f:
        json.dump(meta, f, indent=1)


def sass(outdir: str, cc: int = 90) -> str:
    """Instructions per main-loop step and per weight of each dumped int4 kernel's sm_``cc`` cubin."""
    import json
    import subprocess

    from benchmarks.analysis import cuda_sass

    meta = json.load(open(os.path.join(outdir, "int4_cases.json")))
    cuobjdump = cuda_sass.find_cuobjdump(os.environ.get("CUOBJDUMP") or _triton_cuobjdump())
    out = {}
    for name, m in sorted(meta.items()):
        cubin = os.path.join(outdir, f"{name}.sm{cc}.cubin")
        if not os.path.exists(cubin):
            continue
        listing = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        (ins,) = cuda_sass.functions(listing).values()
        r = cuda_sass.analyse(ins)
        per_thread = m["weights_per_step"] / (32 * m["block_sizes"]["num_warps"])
        step = r["loop"]["instructions"] if "loop" in r else r["instructions"]  # dequant: one block, no loop
        out[name] = dict(m, instructions=r["instructions"], loop_instructions=r.get("loop", {}).get("instructions"),
                         instructions_per_weight=round(step / per_thread, 2),
                         loop_histogram=r.get("loop", r)["histogram"])
        print(f"{name}: {step} instructions a step, {out[name]['instructions_per_weight']} a weight")
    path = os.path.join(outdir, f"sass_sm{cc}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return path


def _triton_cuobjdump() -> str | None:
    """The cuobjdump of the offline check's own venv (`../shared/tools/triton-offline-check` makes it)."""
    venv = os.environ.get("LTJAX_TRITON_VENV", os.path.expanduser("~/.cache/ltjax-triton/venv"))
    found = sorted(Path(venv).glob("lib/python*/site-packages/triton/backends/nvidia/bin/cuobjdump"))
    return str(found[0]) if found else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", nargs="?", default="build/ttir", help="where the IR goes")
    ap.add_argument("--sweep", action="store_true", help="the sweep's Triton candidates instead of the tuned rows")
    ap.add_argument("--size", type=int, default=2048, help="K = N of the --sweep weight")
    ap.add_argument("--only", nargs="+", default=(), metavar="PREFIX", help="--sweep groups, as pallas_sweep's")
    ap.add_argument("--int4", action="store_true", help="the int4 kernels at their tuned rows, 8192² and SmolLM2")
    ap.add_argument("--sass", action="store_true", help="read the compiled int4 cubins in outdir back: instructions")
    a = ap.parse_args(argv)
    if a.sass:
        print(f"wrote {sass(a.outdir)}")
    elif a.int4:
        dump_int4(a.outdir)
    elif a.sweep:
        sweep_candidates(a.outdir, a.size, tuple(a.only))
    else:
        dump(a.outdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
