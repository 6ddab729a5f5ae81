"""Pack time, ratio and reference-decode speed of each codec for a few sizes; prints a table, writes JSON.

    python -m benchmarks.pack [--out PATH] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

import ltjax
from benchmarks import _common as C
from ltjax._format import pack


def _median_time(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def run(sizes, sparsities, reps):
    rows = []
    rng = np.random.default_rng(0)
    for n, sparsity in itertools.product(sizes, sparsities):
        x = rng.standard_normal((n, n), dtype=np.float32)
        x[rng.random(x.shape) < sparsity] = 0
        for codec in ltjax.CODECS:
            t_pack = _median_time(lambda: pack(x, codec), reps)
            ct = pack(x, codec)
            dec = jax.jit(ltjax.decompress)
            dec(ct).block_until_ready()
            t_dec = _median_time(lambda: dec(ct).block_until_ready(), reps)
            rows.append(
                dict(n=n, sparsity=sparsity, codec=codec, pack_s=t_pack, decode_s=t_dec, nbytes=ct.nbytes,
                     dense_nbytes=ct.dense_nbytes, ratio=ct.ratio, decode_dense_GBps=ct.dense_nbytes / t_dec / 1e9)
            )
            r = rows[-1]
            print(f"{n:>5}x{n:<5} {sparsity:>4.0%} {codec:<13} pack {t_pack * 1e3:8.1f} ms  ratio {r['ratio']:5.2f}x  "
                  f"decode {t_dec * 1e3:8.2f} ms ({r['decode_dense_GBps']:.2f} GB/s dense out)")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", help="JSON output path (default benchmarks/results/<date>-<backend>[-quick]/pack.json)")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions (CI smoke run)")
    args = ap.parse_args(argv)
    args.out = C.out_path(args, "pack")
    sizes, reps = ([256, 1024], 2) if args.quick else ([1024, 4096], 5)
    rows = run(sizes, [0.0, 0.5, 0.9], reps)
    result = dict(benchmark="pack", backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                  machine=platform.machine(), processor=platform.processor(), jax=jax.__version__,
                  ltjax=ltjax.__version__, date=time.strftime("%Y-%m-%d"), rows=rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
