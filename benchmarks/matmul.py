"""Times `ltjax.matmul` against the dense dot (f32, bf16) and the naive `x @ decompress(ct)`.

Runs on whatever backend jax has. For each K = N, codec, sparsity and M it reports the
median time of ltjax, the f32 and bf16 dense dots and the naive decode-then-dot (all
measured in the same run), the compressed weight bytes streamed per second, and the
speedups over each baseline. Prints a table and writes JSON.

    PYTHONPATH=. python -m benchmarks.matmul            # full sweep
    PYTHONPATH=. python -m benchmarks.matmul --quick    # CI smoke: small sizes, few reps
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import ltjax
from ltjax import _ops
from ltjax._format import pack

CASES = (("int8", 0.0), ("bitmask_int8", 0.5), ("bitmask_int8", 0.9))


def median_time(f, *args, reps: int, warmup: int = 2) -> float:
    """Median wall time in seconds of ``f(*args)`` (already jitted), after warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if os.path.exists("COMMIT"):
        return open("COMMIT").read().strip()
    return "unknown"


def make_weight(rng: np.random.Generator, k: int, n: int, sparsity: float) -> np.ndarray:
    w = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    if sparsity:
        w[rng.random((k, n)) < sparsity] = 0.0
    return w


def run(sizes, ms, cases, reps: int, seed: int = 0, log=print) -> list[dict]:
    rng = np.random.default_rng(seed)
    dense_f32 = jax.jit(lambda x, w: x @ w)
    dense_bf16 = jax.jit(lambda x, w: (x.astype(jnp.bfloat16) @ w))
    fused = jax.jit(lambda x, ct: ltjax.matmul(x, ct))
    naive = jax.jit(lambda x, ct: x @ ltjax.decompress(ct).astype(x.dtype))
    rows = []
    for kn in sizes:
        w_dense = {}
        baselines: dict[int, tuple[float, float]] = {}
        w0 = make_weight(rng, kn, kn, 0.0)
        w_f32 = jnp.asarray(w0)
        w_bf16 = w_f32.astype(jnp.bfloat16)
        xs = {m: jnp.asarray(rng.standard_normal((m, kn), dtype=np.float32)) for m in ms}
        for m in ms:
            baselines[m] = (
                median_time(dense_f32, xs[m], w_f32, reps=reps),
                median_time(dense_bf16, xs[m], w_bf16, reps=reps),
            )
        del w_dense
        for codec, sparsity in cases:
            ct = jax.device_put(pack(make_weight(rng, kn, kn, sparsity), codec))
            for m in ms:
                x = xs[m]
                impl = _ops._choose_impl(x, ct, None).impl
                t = median_time(fused, x, ct, reps=reps)
                t_naive = median_time(naive, x, ct, reps=reps)
                t_f32, t_bf16 = baselines[m]
                row = dict(
                    M=m, K=kn, N=kn, codec=codec, sparsity=sparsity, impl=impl,
                    weight_bytes=ct.nbytes, ratio=round(ct.ratio, 3),
                    t_ltjax_ms=t * 1e3, t_f32_ms=t_f32 * 1e3, t_bf16_ms=t_bf16 * 1e3, t_naive_ms=t_naive * 1e3,
                    weight_GBps=ct.nbytes / t / 1e9,
                    speedup_vs_f32=t_f32 / t, speedup_vs_bf16=t_bf16 / t, speedup_vs_naive=t_naive / t,
                )
                rows.append(row)
                log(format_row(row))
            del ct
    return rows


HEADER = (
    f"{'M':>3} {'K=N':>5} {'codec':>12} {'sp':>4} {'impl':>9} {'t_ltjax':>9} {'t_f32':>9} {'t_bf16':>9} "
    f"{'t_naive':>9} {'GB/s':>7} {'x f32':>6} {'x bf16':>6} {'x naive':>7}"
)


def format_row(r: dict) -> str:
    return (
        f"{r['M']:>3} {r['K']:>5} {r['codec']:>12} {r['sparsity']:>4.1f} {r['impl']:>9} {r['t_ltjax_ms']:>9.3f} "
        f"{r['t_f32_ms']:>9.3f} {r['t_bf16_ms']:>9.3f} {r['t_naive_ms']:>9.3f} {r['weight_GBps']:>7.2f} "
        f"{r['speedup_vs_f32']:>6.2f} {r['speedup_vs_bf16']:>6.2f} {r['speedup_vs_naive']:>7.2f}"
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few reps (CI smoke)")
    p.add_argument("--sizes", type=int, nargs="+", help="K = N values (default 1024 4096)")
    p.add_argument("--ms", type=int, nargs="+", help="M values (default 1 4 16 64)")
    p.add_argument("--reps", type=int, help="timed runs per point (median reported; default 30)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/matmul_<backend>.json)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    a = p.parse_args(argv)
    sizes = a.sizes or ([256] if a.quick else [1024, 4096])
    ms = a.ms or ([1, 4] if a.quick else [1, 4, 16, 64])
    reps = a.reps or (3 if a.quick else 30)
    backend = jax.default_backend()
    out = a.out or os.path.join("benchmarks", "results", f"matmul_{backend}{'_quick' if a.quick else ''}.json")
    print(f"backend={backend} device={jax.devices()[0].device_kind} jax={jax.__version__} reps={reps}")
    print(HEADER)
    rows = run(sizes, ms, CASES, reps)
    result = dict(
        benchmark="ltjax.matmul",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        backend=backend,
        device=jax.devices()[0].device_kind,
        jax_version=jax.__version__,
        ltjax_version=ltjax.__version__,
        commit=git_commit(),
        host=dict(machine=platform.machine(), cpus=os.cpu_count(), python=sys.version.split()[0]),
        reps=reps,
        timing="median of reps after 2 warm-up calls; jitted; block_until_ready",
        note=a.note,
        rows=rows,
    )
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
