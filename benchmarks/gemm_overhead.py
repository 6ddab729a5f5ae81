"""GEMM overhead: time of `ltjax.matmul(x, ct)` / time of the dense dot, across M and sizes.

For each K = N, codec and M it times, in the same run, ``ltjax.matmul`` on the compressed
weight, the f32 dot and the bf16 dot (weights stored in that dtype), and reports the
ratios (overhead > 1: compression costs time; < 1: it pays). The crossover is the first M
at which ltjax is slower than the dense dot; the "< 10% overhead" claim is checked per M.

    python -m benchmarks.gemm_overhead [--quick] [--out PATH]

The op layer dispatches by backend and shape; this script only calls the public
``ltjax.matmul`` and records which path ran when the op layer says so.
"""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

import ltjax
from benchmarks import _common as C

CASES = (("int8", 0.0), ("bitmask_int8", 0.5))
MS_FULL = (1, 4, 16, 64, 256, 1024, 4096)
SIZES_FULL = (1024, 4096)


def _timed(fn, *, budget_s: float, max_reps: int) -> float:
    """Median time with a repetition count sized to ~``budget_s`` per point (>= 3 reps)."""
    jax.block_until_ready(fn())  # compile + first run
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    one = time.perf_counter() - t0
    reps = int(min(max_reps, max(3, budget_s / max(one, 1e-6))))
    return C.median_time(fn, reps=reps, warmup=0)


def _impl_name(x, ct) -> str:
    return ltjax.explain(x, ct).impl


def run(sizes, ms, cases, *, budget_s: float, max_reps: int, log=print) -> list[dict]:
    rng = np.random.default_rng(0)
    f32 = jax.jit(lambda x, w: x @ w)
    bf16 = jax.jit(lambda x, w: x.astype(jnp.bfloat16) @ w)
    lt = jax.jit(ltjax.matmul)
    rows = []
    for kn in sizes:
        w = (rng.standard_normal((kn, kn), dtype=np.float32) / np.sqrt(kn)).astype(np.float32)
        w32, w16 = jnp.asarray(w), jnp.asarray(w).astype(jnp.bfloat16)
        base = {}
        for m in ms:
            x = jnp.asarray(rng.standard_normal((m, kn), dtype=np.float32))
            base[m] = (x, _timed(lambda: f32(x, w32), budget_s=budget_s, max_reps=max_reps),
                       _timed(lambda: bf16(x, w16), budget_s=budget_s, max_reps=max_reps))
        for codec, sparsity in cases:
            ws = w.copy()
            if sparsity:
                ws[np.abs(ws) < np.quantile(np.abs(ws), sparsity)] = 0.0  # magnitude pruning
            ct = jax.device_put(ltjax.compress(ws, codec))
            for m in ms:
                x, t32, t16 = base[m]
                t = _timed(lambda: lt(x, ct), budget_s=budget_s, max_reps=max_reps)
                row = dict(M=m, K=kn, N=kn, codec=codec, sparsity=sparsity, impl=_impl_name(x, ct),
                           weight_bytes=ct.nbytes, ratio=ct.ratio,
                           t_ltjax_ms=t * 1e3, t_f32_ms=t32 * 1e3, t_bf16_ms=t16 * 1e3,
                           overhead_vs_f32=t / t32, overhead_vs_bf16=t / t16,
                           gflops_ltjax=2 * m * kn * kn / t / 1e9, gflops_f32=2 * m * kn * kn / t32 / 1e9,
                           gflops_bf16=2 * m * kn * kn / t16 / 1e9,
                           weight_GBps=ct.nbytes / t / 1e9)
                rows.append(row)
                log(f"K=N={kn:5d} {codec:>12} {sparsity:4.0%} M={m:5d}  ltjax {t * 1e3:9.3f} ms  "
                    f"f32 {t32 * 1e3:9.3f} ms  bf16 {t16 * 1e3:9.3f} ms  "
                    f"ltjax/f32 {t / t32:6.2f}x  ltjax/bf16 {t / t16:6.2f}x  [{row['impl']}]")
    return rows


def crossovers(rows: list[dict]) -> list[dict]:
    """Per (K, codec): overhead per M, the first M where ltjax is slower than dense, and the
    Ms where the "< 10% overhead" claim holds."""
    out = []
    keyf = lambda r: (r["K"], r["codec"], r["sparsity"])
    for key, grp in itertools.groupby(sorted(rows, key=keyf), key=keyf):
        grp = sorted(grp, key=lambda r: r["M"])
        entry = {"K": key[0], "N": key[0], "codec": key[1], "sparsity": key[2]}
        for base in ("f32", "bf16"):
            ov = [(r["M"], r[f"overhead_vs_{base}"]) for r in grp]
            slower = [m for m, o in ov if o > 1.0]
            entry[f"overhead_vs_{base}"] = {str(m): round(o, 4) for m, o in ov}
            entry[f"first_M_slower_than_{base}"] = slower[0] if slower else None
            entry[f"M_within_10pct_of_{base}"] = [m for m, o in ov if o <= 1.10]
        out.append(entry)
    return out


def main(argv=None) -> int:
    p = C.parser(__doc__.splitlines()[0], "gemm_overhead")
    p.add_argument("--sizes", type=int, nargs="+", help=f"K = N values (default {SIZES_FULL})")
    p.add_argument("--ms", type=int, nargs="+", help=f"M values (default {MS_FULL})")
    args = p.parse_args(argv)
    args.out = C.out_path(args, "gemm_overhead")
    sizes = tuple(args.sizes or ((256,) if args.quick else SIZES_FULL))
    ms = tuple(args.ms or ((1, 16, 256) if args.quick else MS_FULL))
    budget_s, max_reps = (0.05, 5) if args.quick else (1.0, 30)
    load0 = C.loadavg()
    rows = run(sizes, ms, CASES, budget_s=budget_s, max_reps=max_reps)
    cross = crossovers(rows)
    print(C.table(["K=N", "codec", "sparsity", "first M slower than f32", "first M slower than bf16",
                   "M within 10% of f32"],
                  [[c["K"], c["codec"], f"{c['sparsity']:.0%}", c["first_M_slower_than_f32"],
                    c["first_M_slower_than_bf16"], c["M_within_10pct_of_f32"]] for c in cross]))
    res = C.result("gemm_overhead", args.quick, loadavg_start=load0, loadavg_end=C.loadavg(),
                   timing="jitted; median of 3..30 runs sized to ~1 s per point (quick: 3..5), "
                          "after compile + 1 run; block_until_ready",
                   sizes=list(sizes), ms=list(ms), rows=rows, crossovers=cross,
                   kpi={"latency_ms": {f"matmul/{r['codec']}/K{r['K']}/M{r['M']}": r["t_ltjax_ms"]
                                       for r in rows}})
    print(f"wrote {C.write_json(args.out, res)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
