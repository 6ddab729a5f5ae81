"""int4 on the CPU handlers against int8 on the same handlers and XLA's f32 dot, in the same run.

    python -m benchmarks.int4_matmul [--quick] [--size 8192] [--ms 1 16] [--group 64] [--rounds 30]
                                     [--out PATH]

K = N = ``--size`` (default 8192: the f32 weight is 256 MiB, int8 64 MiB, int4 34 MiB at G = 64,
all beyond the last-level cache of the CPUs this runs on). Candidates, all on the same x: the int4
handlers (symmetric, and asymmetric with mins), the int8 handlers, XLA's f32 dot (``x @ w``).
Two regimes, each timed in interleaved rounds, one call per candidate per round in a fresh random
order (so load from other processes and what the previous call left in the cache fall on all of
them alike), median over rounds:

* ``shuffled``: calls back to back, whatever the previous candidate left in the caches;
* ``cold``: a 256 MiB buffer read before every call, so every weight comes from DRAM (a decode
  loop over a model larger than the cache).

Prints one row per (M, candidate) with the median, its GB/s of weight bytes and the ratios to
int8 and to the f32 dot of the same rounds, then the issue's targets (#22 item 5: M = 1, int4 at
least 1.6x faster than int8 and 6x the f32 dot; M = 16, int4 not slower than int8), each met or
not, in both regimes. ``--quick``: 512², M = 1 and 4, 3 rounds, a smoke test whose times are not
figures. `LTJAX_FFI_ISA=avx2` / `LTJAX_FFI_VNNI=0` time the AVX2 kernels / the f32 walk (the
JSON's `ffi` says which ran). Without the CPU extension the JSON says why (``skipped``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import ltjax
import ltjax.ffi.cpu as lffi
from benchmarks import _common as C
from ltjax._format import pack

COLD_FLUSH_MIB = 256
# (M, candidate, over, at least): the targets, as ratios of median times (over / candidate)
TARGETS = ((1, "ffi_int4", "ffi_int8", 1.6), (1, "ffi_int4", "xla_f32_dot", 6.0), (16, "ffi_int4", "ffi_int8", 1.0))


def _rounds(fns: dict, rounds: int, *, flush: np.ndarray | None, seed: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate over ``rounds`` interleaved rounds (a fresh random order
    each round); with ``flush``, the buffer is read before every call."""
    for f in fns.values():  # compile, warm up
        for _ in range(2):
            jax.block_until_ready(f())
    names = list(fns)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            if flush is not None:
                flush.sum()
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name]())
            times[name].append(time.perf_counter() - t0)
    return times


def run(size: int, ms, group: int, rounds: int, *, cold: bool = True) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((size, size), dtype=np.float32)
    cts = {
        "ffi_int4": pack(w, "int4", group=group),
        "ffi_int4_asym": pack(w, "int4", group=group, asymmetric=True),
        "ffi_int8": pack(w, "int8"),
    }
    cts = {k: jax.tree.map(jnp.asarray, ct) for k, ct in cts.items()}
    wf = jnp.asarray(w)
    del w
    weight_bytes = {k: int(ct.nbytes - ct.checksums.size * 4) for k, ct in cts.items()}
    weight_bytes["xla_f32_dot"] = size * size * 4
    ffi, dot = jax.jit(lffi.matmul), jax.jit(lambda x, w: x @ w)
    flush = np.ones(COLD_FLUSH_MIB << 18, np.float32) if cold else None
    rows = []
    for m in ms:
        x = jnp.asarray(rng.standard_normal((m, size), dtype=np.float32))
        paths = {k: ltjax.explain(x, ct).impl for k, ct in cts.items()}
        fns = {k: (lambda ct=ct: ffi(x, ct)) for k, ct in cts.items()}
        fns["xla_f32_dot"] = lambda: dot(x, wf)
        regimes = {"shuffled": _rounds(fns, rounds, flush=None, seed=m)}
        if cold:
            regimes["cold"] = _rounds(fns, rounds, flush=flush, seed=m + 1)
        for regime, times in regimes.items():
            med = {k: statistics.median(v) for k, v in times.items()}
            for name, ts in times.items():
                row = {
                    "K": size, "N": size, "M": m, "group": group, "regime": regime, "candidate": name,
                    "median_us": med[name] * 1e6, "p10_us": float(np.percentile(ts, 10)) * 1e6, "runs": len(ts),
                    "weight_bytes": weight_bytes[name], "weight_GBps": weight_bytes[name] / med[name] / 1e9,
                    "speedup_vs_int8": med["ffi_int8"] / med[name],
                    "speedup_vs_f32_dot": med["xla_f32_dot"] / med[name],
                    "ltjax_matmul_path": paths.get(name),
                }
                rows.append(row)
                print(f"K=N={size} M={m:3d} {regime:8s} {name:14s} {row['median_us']:10.1f} us "
                      f"{row['weight_GBps']:6.1f} GB/s  x{row['speedup_vs_int8']:5.2f} vs int8  "
                      f"x{row['speedup_vs_f32_dot']:6.2f} vs f32 dot", flush=True)
    return rows, targets(rows)


def targets(rows: list[dict]) -> list[dict]:
    """Each of `TARGETS` in each regime measured: the ratio and whether it is met."""
    out = []
    for m, cand, over, at_least in TARGETS:
        for row in rows:
            if row["M"] == m and row["candidate"] == cand:
                ratio = row["speedup_vs_int8"] if over == "ffi_int8" else row["speedup_vs_f32_dot"]
                out.append({"M": m, "regime": row["regime"], "what": f"{cand} over {over}", "at_least": at_least,
                            "ratio": ratio, "met": bool(ratio >= at_least)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized run: 512², M = 1 and 4, 3 rounds")
    p.add_argument("--size", type=int, help="K = N (default 8192; --quick 512)")
    p.add_argument("--ms", type=int, nargs="+", help="M values (default 1 16; --quick 1 4)")
    p.add_argument("--group", type=int, default=64, choices=(32, 64, 128), help="int4 scale group (default 64)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per regime (default 30; --quick 3)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold regime")
    p.add_argument("--out", help="JSON output path (default benchmarks/results/<date>-<backend>[-quick]/"
                                 "int4_matmul.json)")
    a = p.parse_args(argv)
    size = a.size or (512 if a.quick else 8192)
    ms = a.ms or ([1, 4] if a.quick else [1, 16])
    rounds = a.rounds or (3 if a.quick else 30)
    out = C.out_path(a, "int4_matmul")
    if not lffi.available():
        why = f"ltjax.ffi.cpu is unavailable: {lffi.unavailable_reason()}"
        print(f"int4_matmul: skipped: {why}")
        C.write_json(out, C.result("int4_matmul", a.quick, skipped=why, ffi=lffi.info(), rows=[]))
        print(f"wrote {out}")
        return 0
    load_start = C.loadavg()
    rows, met = run(size, ms, a.group, rounds, cold=not a.no_cold)
    for t in met:
        print(f"target M={t['M']} {t['regime']:8s} {t['what']:24s} >= {t['at_least']:4.1f}x: "
              f"{t['ratio']:5.2f}x {'met' if t['met'] else 'NOT met'}")
    note = ("interleaved rounds, a fresh random order each round, medians; cold: a "
            f"{COLD_FLUSH_MIB} MiB buffer read before every call" + ("; --quick: a smoke run" if a.quick else ""))
    C.write_json(out, C.result("int4_matmul", a.quick, ffi=lffi.info(), loadavg_start=load_start, note=note,
                               size=size, ms=ms, group=a.group, rounds=rounds, rows=rows, targets=met))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
