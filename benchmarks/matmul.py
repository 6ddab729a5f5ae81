"""Times `ltjax.matmul` against the dense dot (f32, bf16), the naive `x @ decompress(ct)` and, for
int8, the plain-XLA path a JAX quantization library lowers to, and the decode-to-dense op
against a device copy of the same output.

Runs on whatever backend jax has. For each K = N, codec, sparsity, activation dtype and M it
reports the median time per layer of ltjax, the f32 and bf16 dense dots and the naive
decode-then-dot (all measured in the same run), for int8 the plain-XLA int8 path
``(x @ codes.astype(x.dtype).T) * scales`` (the int8 codes as an XLA dot operand, the
per-channel scale after: what a qwix/AQT weight-only int8 user gets), the compressed weight
bytes streamed per second, the speedups over each baseline, and the relative difference
between the ltjax and naive outputs. Prints a table and writes JSON.

Each timed call is a chain of ``--layers`` layers, ``y = op(y, W_i)`` over distinct copies of
the weight, jitted as one program (default: 8 on GPU, 1 elsewhere). On a GPU a single 8192²
matmul at batch 1 takes tens of microseconds, the same order as the host's dispatch and
synchronisation, and a weight used call after call would sit in the 50-60 MB L2 cache; the
chain amortises the first and the distinct copies defeat the second, as a decoder's layer
stack does.

With ``--burst N`` (default 8 on a GPU, off elsewhere) each row is timed once more against the
dense dot of its activations' dtype (bf16 or f32), the two chains in alternation and each sample
``N`` back-to-back calls waiting only for the last (`_common.paired_median_times`): the pair sees
the same machine state, and the host's dispatch overlaps the device's work as in a decode loop
instead of adding a fixed cost per call, which weighs more on the faster op. Those figures are the
``*_paired`` fields; the unpaired ones are kept, timed as before.

The unpack rows time ``ltjax.decompress`` (the op, whatever path it takes) and, where the
Pallas kernels run natively, the kernel alone (storage layout, before any transpose), against
``a + s`` over an f32 array of the output's size: bandwidth counts bytes read plus bytes
written for all three.

    PYTHONPATH=. python -m benchmarks.matmul            # full sweep
    PYTHONPATH=. python -m benchmarks.matmul --quick    # CI smoke: small sizes, few reps
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import ltjax
import ltjax.pallas as lp
from benchmarks import _common
from ltjax._format import pack

# int4: `pack`'s default, symmetric with 64-column groups (4.25 bits a weight). Right after int8, so
# that a run cut short by its deadline still times the two fused dequant kernels against the dots.
CASES = (("int8", 0.0), ("int4", 0.0), ("bitmask_int8", 0.5), ("bitmask_int8", 0.9))
UNPACK_CASES = (("bitmask_int8", 0.5), ("bitmask_int8", 0.9), ("int8", 0.0), ("int4", 0.0))
_DEQUANT = {"int8": lp.int8_dequant, "int4": lp.int4_dequant}


def make_weight(rng: np.random.Generator, k: int, n: int, sparsity: float) -> np.ndarray:
    w = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    if sparsity:
        w[rng.random((k, n)) < sparsity] = 0.0
    return w


def replicate(tree, n: int) -> list:
    """``n`` copies of a pytree of device arrays, each in its own buffers (no cache reuse across copies)."""
    return [tree] + [jax.tree.map(jnp.copy, tree) for _ in range(n - 1)]


def chain(op):
    """A jitted ``(x, ws) -> op(...op(op(x, ws[0]), ws[1])..., ws[-1])``: one program for all layers."""
    def run(x, ws):
        for w in ws:
            x = op(x, w)
        return x
    return jax.jit(run)


def plain_int8_matmul(x, ct):
    """``x @ W`` for an int8 `CompressedTensor` as plain XLA: the codes ``[N, K]`` converted to x's
    dtype as the dot's operand, the per-output-channel scales applied after (no ltjax op)."""
    y = jnp.matmul(x, ct.codes.astype(x.dtype).T, preferred_element_type=jnp.float32)
    return (y * ct.scales.astype(jnp.float32)[None, :]).astype(x.dtype)


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run(sizes, ms, cases, x_dtypes, reps: int, layers: int, seed: int = 0, on_row=None, burst: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    dense_f32 = chain(lambda x, w: x @ w)
    dense_bf16 = chain(lambda x, w: x.astype(jnp.bfloat16) @ w)
    fused = chain(lambda x, ct: ltjax.matmul(x, ct))
    naive = chain(lambda x, ct: x @ ltjax.decompress(ct).astype(x.dtype))
    plain_int8 = chain(plain_int8_matmul)
    per_layer = lambda f, *a: _common.median_time(lambda: f(*a), reps=reps) / layers
    rows = []
    for kn in sizes:
        w_f32 = jnp.asarray(make_weight(rng, kn, kn, 0.0))
        ws_f32 = replicate(w_f32, layers)
        ws_bf16 = [w.astype(jnp.bfloat16) for w in ws_f32]
        xs = {m: jnp.asarray(rng.standard_normal((m, kn), dtype=np.float32)) for m in ms}
        baselines = {m: (per_layer(dense_f32, xs[m], ws_f32), per_layer(dense_bf16, xs[m], ws_bf16)) for m in ms}
        dense_of = {"float32": (dense_f32, ws_f32), "bfloat16": (dense_bf16, ws_bf16)} if burst else {}
        del ws_f32, ws_bf16, w_f32  # kept only through dense_of, for the paired timing
        for codec, sparsity in cases:
            cts = replicate(jax.device_put(pack(make_weight(rng, kn, kn, sparsity), codec)), layers)
            for xdt in x_dtypes:
                for m in ms:
                    x = xs[m].astype(xdt)
                    impl = ltjax.explain(x, cts[0]).impl
                    row = dict(M=m, K=kn, N=kn, codec=codec, sparsity=sparsity, x_dtype=jnp.dtype(xdt).name,
                               impl=impl, layers=layers, weight_bytes=cts[0].nbytes, ratio=round(cts[0].ratio, 3))
                    if impl == "pallas":  # which GPU kernel: Triton, or the int8 Mosaic GPU one
                        row["kernel"] = lp.kernel_backend(x, cts[0])
                    try:
                        err = rel_diff(fused(x, cts), naive(x, cts))
                        t, t_naive = per_layer(fused, x, cts), per_layer(naive, x, cts)
                    except Exception as e:  # e.g. a block too large for this GPU: record it, go on
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    else:
                        t_f32, t_bf16 = baselines[m]
                        if codec == "int8":
                            t_plain = per_layer(plain_int8, x, cts)
                            row.update(t_plain_int8_ms=t_plain * 1e3, speedup_vs_plain_int8=t_plain / t,
                                       rel_diff_plain_int8_vs_naive=rel_diff(plain_int8(x, cts), naive(x, cts)))
                        row.update(
                            t_ltjax_ms=t * 1e3, t_f32_ms=t_f32 * 1e3, t_bf16_ms=t_bf16 * 1e3,
                            t_naive_ms=t_naive * 1e3, weight_GBps=cts[0].nbytes / t / 1e9,
                            speedup_vs_f32=t_f32 / t, speedup_vs_bf16=t_bf16 / t, speedup_vs_naive=t_naive / t,
                            rel_diff_vs_naive=err,
                        )
                        if row["x_dtype"] in dense_of:  # the same op against its dense dot, in alternation
                            dense, ws = dense_of[row["x_dtype"]]
                            t_p, t_d = _common.paired_median_times(
                                [lambda x=x, cts=cts: fused(x, cts), lambda xm=xs[m], ws=ws: dense(xm, ws)],
                                reps=reps, burst=burst)
                            row.update(paired_dense=row["x_dtype"], paired_burst=burst,
                                       t_ltjax_paired_ms=t_p / layers * 1e3, t_dense_paired_ms=t_d / layers * 1e3,
                                       speedup_vs_dense_paired=t_d / t_p)
                    rows.append(row)
                    (on_row or (lambda r: print(format_row(r))))(row)
            del cts
        dense_of.clear()
    return rows


def run_unpack(sizes, cases, reps: int, layers: int, seed: int = 1, on_row=None) -> list[dict]:
    """``ltjax.decompress`` (and the bare Pallas kernel where it runs natively) against a device copy."""
    rng = np.random.default_rng(seed)
    native = jax.default_backend() == "gpu" and not lp.resolve_interpret(None)
    copy = jax.jit(lambda arrays, s: [a + s for a in arrays])
    op = jax.jit(lambda cts: [ltjax.decompress(c) for c in cts])
    kernel = jax.jit(lambda cts: [lp.bitmask_unpack(c) if c.codec.startswith("bitmask") else _DEQUANT[c.codec](c)
                                  for c in cts])
    timed = lambda f, *a: _common.median_time(lambda: f(*a), reps=reps) / layers
    rows = []
    for kn in sizes:
        dense = replicate(jnp.asarray(rng.standard_normal((kn, kn), dtype=np.float32)), layers)
        out_bytes = kn * kn * 4
        t_copy = timed(copy, dense, jnp.float32(1.0))
        del dense
        for codec, sparsity in cases:
            w = make_weight(rng, kn, kn, sparsity)
            cts = replicate(jax.device_put(pack(w, codec)), layers)
            exact = bool(np.array_equal(np.asarray(op(cts[:1])[0]),
                                        np.asarray(ltjax.decompress(cts[0], impl="reference"))))
            moved = cts[0].nbytes + out_bytes
            t_op = timed(op, cts)
            t_kernel = timed(kernel, cts) if native else None
            row = dict(
                K=kn, N=kn, codec=codec, sparsity=sparsity, impl=_common.decompress_impl(cts[0]),
                layers=layers, weight_bytes=cts[0].nbytes, out_bytes=out_bytes, equal_to_reference=exact,
                t_op_ms=t_op * 1e3, t_kernel_ms=None if t_kernel is None else t_kernel * 1e3, t_copy_ms=t_copy * 1e3,
                op_GBps=moved / t_op / 1e9, kernel_GBps=None if t_kernel is None else moved / t_kernel / 1e9,
                copy_GBps=2 * out_bytes / t_copy / 1e9,
            )
            row["op_frac_of_copy"] = row["op_GBps"] / row["copy_GBps"]
            row["kernel_frac_of_copy"] = None if t_kernel is None else row["kernel_GBps"] / row["copy_GBps"]
            rows.append(row)
            (on_row or (lambda r: print(format_unpack_row(r))))(row)
            del cts
    return rows


def read_floor(sizes, reps: int, layers: int, seed: int = 2) -> list[dict]:
    """What XLA's own row reduction over an int8 [K, N] array reads per second: the device's
    practical bandwidth for the bytes an int8 matmul must stream (same chain of distinct copies)."""
    rng = np.random.default_rng(seed)
    f = jax.jit(lambda arrays: [jnp.sum(a, axis=1, dtype=jnp.int32) for a in arrays])
    out = []
    for kn in sizes:
        arrays = replicate(jnp.asarray(rng.integers(-127, 128, (kn, kn), dtype=np.int8)), layers)
        t = _common.median_time(lambda: f(arrays), reps=reps) / layers
        out.append(dict(K=kn, N=kn, bytes=kn * kn, t_ms=t * 1e3, GBps=kn * kn / t / 1e9))
        print(f"read floor {kn}²: XLA int8 row sums {t * 1e3:.4f} ms, {kn * kn / t / 1e9:.1f} GB/s", flush=True)
    return out


HEADER = (
    f"{'M':>3} {'K=N':>5} {'codec':>12} {'sp':>4} {'x':>8} {'impl':>9} {'t_ltjax':>9} {'t_f32':>9} {'t_bf16':>9} "
    f"{'t_naive':>9} {'GB/s':>7} {'x f32':>6} {'x bf16':>6} {'x naive':>7} {'diff':>8}"
)
UNPACK_HEADER = (
    f"{'K=N':>5} {'codec':>12} {'sp':>4} {'impl':>9} {'t_op':>8} {'t_kern':>8} {'t_copy':>8} "
    f"{'op GB/s':>8} {'kern GB/s':>9} {'copy GB/s':>9} {'op/copy':>7} {'kern/copy':>9}"
)


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def format_row(r: dict) -> str:
    if "error" in r:
        return (f"{r['M']:>3} {r['K']:>5} {r['codec']:>12} {r['sparsity']:>4.1f} {r['x_dtype']:>8} {r['impl']:>9} "
                f"FAILED: {r['error']}")
    return (
        f"{r['M']:>3} {r['K']:>5} {r['codec']:>12} {r['sparsity']:>4.1f} {r['x_dtype']:>8} {r['impl']:>9} "
        f"{r['t_ltjax_ms']:>9.4f} {r['t_f32_ms']:>9.4f} {r['t_bf16_ms']:>9.4f} {r['t_naive_ms']:>9.4f} "
        f"{r['weight_GBps']:>7.1f} {r['speedup_vs_f32']:>6.2f} {r['speedup_vs_bf16']:>6.2f} "
        f"{r['speedup_vs_naive']:>7.2f} {r['rel_diff_vs_naive']:>8.1e}"
        + (f"  plain-XLA int8 {r['t_plain_int8_ms']:.4f} -> {r['speedup_vs_plain_int8']:.2f}x"
           if "t_plain_int8_ms" in r else "")
        + (f"  paired x{r['paired_burst']}: {r['t_ltjax_paired_ms']:.4f} vs {r['paired_dense']} dot "
           f"{r['t_dense_paired_ms']:.4f} -> {r['speedup_vs_dense_paired']:.2f}x"
           if "speedup_vs_dense_paired" in r else "")
    )


def format_unpack_row(r: dict) -> str:
    return (
        f"{'' if r['equal_to_reference'] else 'MISMATCH '}{r['K']:>5} {r['codec']:>12} {r['sparsity']:>4.1f} "
        f"{r['impl']:>9} {r['t_op_ms']:>8.4f} "
        f"{_f(r['t_kernel_ms'], '8.4f'):>8} {r['t_copy_ms']:>8.4f} {r['op_GBps']:>8.1f} "
        f"{_f(r['kernel_GBps'], '9.1f'):>9} {r['copy_GBps']:>9.1f} {r['op_frac_of_copy']:>7.2f} "
        f"{_f(r['kernel_frac_of_copy'], '9.2f'):>9}"
    )


def main(argv=None) -> int:
    backend = jax.default_backend()
    p = _common.parser(__doc__.splitlines()[0], "matmul")
    p.add_argument("--sizes", type=int, nargs="+", help="K = N values (default 1024 4096)")
    p.add_argument("--ms", type=int, nargs="+", help="M values (default 1 4 16 64)")
    p.add_argument("--reps", type=int, help="timed runs per point (median reported; default 30)")
    p.add_argument("--layers", type=int, help="layers per timed chain (default 8 on GPU, 1 elsewhere)")
    p.add_argument("--x-dtypes", nargs="+", help="activation dtypes of the ltjax rows "
                   "(default: bfloat16 float32 on GPU, float32 elsewhere)")
    p.add_argument("--codecs", nargs="+", choices=sorted({c for c, _ in CASES}),
                   help="only these codecs' matmul rows (default: all)")
    p.add_argument("--no-unpack", action="store_true", help="skip the decode-to-dense rows")
    p.add_argument("--burst", type=int, help="also time each row against its dense dot in alternation, samples "
                   "of this many back-to-back calls (default 8 on GPU; 0 = off, the default elsewhere)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    a = p.parse_args(argv)
    sizes = a.sizes or ([256] if a.quick else [1024, 4096])
    ms = a.ms or ([1, 4] if a.quick else [1, 4, 16, 64])
    reps = a.reps or (3 if a.quick else 30)
    layers = a.layers or (8 if backend == "gpu" else 1)
    burst = a.burst if a.burst is not None else (8 if backend == "gpu" else 0)
    x_dtypes = a.x_dtypes or (["bfloat16", "float32"] if backend == "gpu" else ["float32"])
    out = _common.out_path(a, "matmul")
    print(f"backend={backend} device={jax.devices()[0].device_kind} jax={jax.__version__} "
          f"reps={reps} layers={layers} (times are per layer)")
    rows, unpack_rows, floor = [], [], []
    meta = dict(reps=reps, layers=layers, burst=burst, note=a.note,
                timing=("median of reps after 2 warm-up calls (and at least 0.1 s of them on a GPU) of one "
                        "jitted chain of `layers` layers over distinct weight copies, block_until_ready, "
                        "divided by `layers`; the *_paired fields (burst > 0): the row's op and its dense dot timed "
                        "in alternation, each sample `burst` back-to-back calls (`_common.paired_median_times`)"))

    def save(complete: bool):  # rewritten after every row: a run cut short keeps what it measured
        return _common.write_json(out, _common.result("ltjax.matmul", a.quick, complete=complete, **meta,
                                                      read_floor=floor, rows=rows, unpack_rows=unpack_rows))

    def emit(fmt, dest):
        def on_row(r):
            dest.append(r)
            print(fmt(r), flush=True)
            save(False)
        return on_row

    floor.extend(read_floor(sizes, reps, layers))
    print(HEADER)
    cases = [c for c in CASES if a.codecs is None or c[0] in a.codecs]
    run(sizes, ms, cases, x_dtypes, reps, layers, on_row=emit(format_row, rows), burst=burst)
    if not a.no_unpack:
        print(UNPACK_HEADER)
        run_unpack(sizes, UNPACK_CASES, reps, layers, on_row=emit(format_unpack_row, unpack_rows))
    print(f"wrote {save(True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
