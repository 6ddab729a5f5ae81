"""Times the CUDA small-M kernels (`ltjax.ffi.cuda`, docs/cuda.md) against the Pallas kernels and
the dense dots, on a CUDA GPU, all in the same run.

For each K = N, activation dtype (bf16 first), codec (int8, bitmask_int8 at 50% and 90%
sparsity) and M (1, 4, 16), per layer of a jitted chain of ``--layers`` distinct weight copies (as
`benchmarks.matmul` times, whose helpers it uses):

- ``t_cuda_ms``: ``ltjax.matmul(x, ct, impl="cuda")`` over weights as `ltjax.compress` gives
  them: bitmask_int8's row starts come from an XLA pass over the mask inside every call;
- ``t_cuda_indexed_ms``: the same over weights that carry their row starts (`ltjax.index_rows`,
  once, outside the timed program); the gap is that pass's cost (int8: the same program);
- ``t_alt_indexed_ms`` (M <= 4, where both kernels apply): ``t_cuda_indexed_ms`` with the other of
  the GEMV and the tensor-core kernel (``alt_kernel``), for where the one should hand over to the other;
- ``t_mma_warps_ms`` (tensor-core rows): ``{warps: ms}``, ``t_cuda_indexed_ms`` with the K
  splits sized for other grids than ``ltjax.ffi.cuda.MMA_WARPS`` (4096 warps), which is not yet timed;
- ``t_pallas_ms``: ``impl="pallas"``, the Triton kernels;
- ``t_bf16_ms``, ``t_f32_ms``: XLA's dense dots; ``t_cuda_paired_ms`` / ``t_dense_paired_ms``: the
  CUDA op over the indexed weights and the dense dot of x's dtype timed in alternation, bursts of
  ``--burst`` calls; ``weight_GBps``: the indexed op's;
- ``rel_diff``: the CUDA op's output against the Pallas one (or the reference), relative L2.

``REQUIRES_BACKEND = "gpu"``: `benchmarks.run` skips a full run elsewhere. ``--quick`` runs at 256²
on any backend, through the kernels' CPU emulation off-GPU: a check of the harness, not a speed.

    PYTHONPATH=. python -m benchmarks.cuda_kernels [--sizes 8192] [--ms 1 4 16]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import ltjax
from benchmarks import _common
from benchmarks.matmul import chain, make_weight, rel_diff, replicate
from ltjax._format import pack
from ltjax.ffi import cuda as lcuda

REQUIRES_BACKEND = "gpu"
CASES = (("int8", 0.0), ("bitmask_int8", 0.5), ("bitmask_int8", 0.9))


MMA_WARPS = (1024, 2048, 8192)  # grid sizes the MMA kernels' K splits are also timed at (default: lcuda.MMA_WARPS)


def _kernel_chain(x, cts, kernel, mma_warps=lcuda.MMA_WARPS):
    """The CUDA custom calls over ``cts`` with ``kernel`` (`ltjax.ffi.cuda.matmul`'s) instead of `kernel_for`'s
    pick, and the MMA kernels' K splits sized for ``mma_warps``."""
    for ct in cts:
        x = lcuda.matmul(x, ct, kernel=kernel, mma_warps=mma_warps)
    return x


def run(sizes, ms, x_dtypes, reps: int, layers: int, burst: int, on_row, seed: int = 0) -> list[dict]:
    on_gpu = jax.default_backend() == "gpu"
    rng = np.random.default_rng(seed)
    cuda = chain(lambda x, ct: ltjax.matmul(x, ct, impl="cuda"))
    forced = jax.jit(_kernel_chain, static_argnames=("kernel", "mma_warps"))
    pallas = chain(lambda x, ct: ltjax.matmul(x, ct, impl="pallas"))
    reference = chain(lambda x, ct: ltjax.matmul(x, ct, impl="reference"))
    dense = {"float32": chain(lambda x, w: x @ w), "bfloat16": chain(lambda x, w: x.astype(jnp.bfloat16) @ w)}
    per_layer = lambda f, *a: _common.median_time(lambda: f(*a), reps=reps) / layers
    rows = []
    for kn in sizes:
        ws32 = replicate(jnp.asarray(make_weight(rng, kn, kn, 0.0)), layers)
        dense_ws = {"float32": ws32, "bfloat16": [w.astype(jnp.bfloat16) for w in ws32]}
        weights = {}  # the bf16 rows of every case first: what a run cut short should keep
        for codec, sparsity in CASES:
            cts = replicate(jax.device_put(pack(make_weight(rng, kn, kn, sparsity), codec)), layers)
            weights[codec, sparsity] = cts, ltjax.index_rows(cts)
        for xdt in x_dtypes:
            for (codec, sparsity), (cts, indexed) in weights.items():
                for m in ms:
                    x = jnp.asarray(rng.standard_normal((m, kn), dtype=np.float32)).astype(xdt)
                    row = dict(K=kn, N=kn, codec=codec, sparsity=sparsity, x_dtype=jnp.dtype(xdt).name, M=m,
                               layers=layers, weight_bytes=cts[0].nbytes)
                    why = lcuda.why_not(x, cts[0], emulate=not on_gpu)
                    if why is not None:
                        row["skipped"] = why
                        on_row(row)
                        continue
                    row["kernel"] = lcuda.kernel_for(x, cts[0])
                    try:
                        y = cuda(x, cts)
                        want = pallas(x, cts) if on_gpu else reference(x, cts)
                        row["rel_diff"] = rel_diff(y, want)
                        row["t_cuda_ms"] = per_layer(cuda, x, cts) * 1e3
                        row["indexed_rel_diff"] = rel_diff(cuda(x, indexed), want)
                        row["t_cuda_indexed_ms"] = per_layer(cuda, x, indexed) * 1e3
                        if m <= lcuda.GEMV_MAX_M:  # both kernels apply: the other one too, for the crossover
                            row["alt_kernel"] = "mma" if row["kernel"] == "gemv" else "gemv"
                            row["alt_rel_diff"] = rel_diff(forced(x, indexed, row["alt_kernel"]), want)
                            row["t_alt_indexed_ms"] = per_layer(forced, x, indexed, row["alt_kernel"]) * 1e3
                        if row["kernel"] == "mma":  # other K splits: per grid size, the indexed op's time
                            row["t_mma_warps_ms"] = {
                                str(wp): per_layer(forced, x, indexed, "mma", wp) * 1e3 for wp in MMA_WARPS}
                            row["mma_warps_rel_diff"] = max(
                                rel_diff(forced(x, indexed, "mma", wp), want) for wp in MMA_WARPS)
                        if on_gpu:
                            row["t_pallas_ms"] = per_layer(pallas, x, cts) * 1e3
                        row["t_f32_ms"] = per_layer(dense["float32"], x, dense_ws["float32"]) * 1e3
                        row["t_bf16_ms"] = per_layer(dense["bfloat16"], x, dense_ws["bfloat16"]) * 1e3
                        d = row["x_dtype"] if row["x_dtype"] in dense else "float32"
                        t_c, t_d = _common.paired_median_times(
                            [lambda: cuda(x, indexed), lambda: dense[d](x, dense_ws[d])], reps=reps, burst=burst)
                        row.update(paired_dense=d, paired_burst=burst, t_cuda_paired_ms=t_c / layers * 1e3,
                                   t_dense_paired_ms=t_d / layers * 1e3, speedup_vs_dense_paired=t_d / t_c,
                                   speedup_vs_bf16=row["t_bf16_ms"] / row["t_cuda_ms"],
                                   speedup_indexed_vs_bf16=row["t_bf16_ms"] / row["t_cuda_indexed_ms"],
                                   weight_GBps=cts[0].nbytes / (row["t_cuda_indexed_ms"] * 1e-3) / 1e9)
                        if "t_pallas_ms" in row:
                            row["speedup_vs_pallas"] = row["t_pallas_ms"] / row["t_cuda_ms"]
                    except Exception as e:  # a kernel that fails here is the finding: record it, go on
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    on_row(row)
                    rows.append(row)
        del weights
    return rows


def format_row(r: dict) -> str:
    head = f"{r['M']:>3} {r['K']:>5} {r['codec']:>12} {r['sparsity']:>4.1f} {r['x_dtype']:>8}"
    if "skipped" in r:
        return f"{head}  skipped: {r['skipped']}"
    if "error" in r:
        return f"{head}  ERROR {r['error']}"
    ms = lambda k: f"{r[k]:9.4f}" if k in r else f"{'-':>9}"
    return (f"{head} {r['kernel']:>5} {ms('t_cuda_ms')} {ms('t_cuda_indexed_ms')} {ms('t_pallas_ms')} "
            f"{ms('t_bf16_ms')} "
            f"{r['speedup_vs_bf16']:6.2f} {r['speedup_vs_dense_paired']:6.2f} {r['rel_diff']:8.1e}"
            + (f"  {r['alt_kernel']}: {r['t_alt_indexed_ms']:.4f}" if "t_alt_indexed_ms" in r else ""))


HEADER = (f"{'M':>3} {'K=N':>5} {'codec':>12} {'sp':>4} {'x':>8} {'kern':>5} {'t_cuda':>9} {'t_index':>9} "
          f"{'t_pallas':>9} {'t_bf16':>9} {'x bf16':>6} {'paired':>6} {'diff':>8}")


def main(argv=None) -> int:
    backend = jax.default_backend()
    p = _common.parser(__doc__.splitlines()[0], "cuda_kernels")
    p.add_argument("--sizes", type=int, nargs="+", help="K = N values (default 8192; --quick 256)")
    p.add_argument("--ms", type=int, nargs="+", help="M values (default 1 4 16)")
    p.add_argument("--reps", type=int, help="timed runs per point (default 20; --quick 2)")
    p.add_argument("--layers", type=int, help="layers per timed chain (default 8 on GPU, 1 elsewhere)")
    p.add_argument("--x-dtypes", nargs="+", default=["bfloat16", "float32"], help="activation dtypes")
    p.add_argument("--burst", type=int, help="calls per paired sample (default 8 on GPU, 1 elsewhere)")
    a = p.parse_args(argv)
    sizes = a.sizes or ([256] if a.quick else [8192])
    ms = a.ms or [1, 4, 16]
    reps = a.reps or (2 if a.quick else 20)
    layers = a.layers or (8 if backend == "gpu" else 1)
    burst = a.burst or (8 if backend == "gpu" else 1)
    out = _common.out_path(a, "cuda_kernels")
    path, why = lcuda.library()
    meta = dict(reps=reps, layers=layers, burst=burst, library=str(path) if path else None, library_reason=why,
                note=None if backend == "gpu" else "no GPU: the kernels' CPU emulation ran; its times are not speeds")
    print(f"backend={backend} device={jax.devices()[0].device_kind} library={path or why}")
    rows: list[dict] = []

    def on_row(r):  # the JSON is rewritten after every row: a run cut short keeps what it measured
        rows.append(r)
        print(format_row(r), flush=True)
        _common.write_json(out, _common.result("cuda_kernels", a.quick, complete=False, **meta, rows=rows))

    print(HEADER)
    run(sizes, ms, a.x_dtypes, reps, layers, burst, on_row)
    print(f"wrote {_common.write_json(out, _common.result('cuda_kernels', a.quick, complete=True, **meta, rows=rows))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
