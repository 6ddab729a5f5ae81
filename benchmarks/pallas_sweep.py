"""Block-size sweep of the fused Pallas matmul kernels on a GPU: the data behind `TUNED_BLOCK_SIZES`.

For each kernel (fused int8 and bitmask_int8 matmul, the unpack kernels), M, activation
dtype and candidate `BlockSizes` it times a jitted chain of ``--layers`` forward matmuls over
distinct weight copies (as `benchmarks.matmul` does), or ``--layers`` unpacks, and checks
each candidate's output against the tuned configuration's. Rows are written to the JSON as they are
measured; ``--budget`` seconds bounds the whole sweep (candidates left when it runs out are listed as skipped).

    PYTHONPATH=. python -m benchmarks.pallas_sweep --out OUT.json        # GPU only
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import ltjax.pallas as lp
from benchmarks import _common
from benchmarks.matmul import chain, make_weight, rel_diff, replicate
from ltjax._format import pack
from ltjax.pallas import BlockSizes, MosaicTiles
from ltjax.pallas.int8_matmul_mosaic import why_not_mosaic

REQUIRES_BACKEND = "gpu"  # benchmarks.run skips a full sweep elsewhere (--quick runs in interpret mode)
B = BlockSizes
S = lambda *a: BlockSizes(*a, swap_ab=True)
# Bitmask kernels with each stored 256-row tile cut into row bands of `band` rows, a program each
# (`BlockSizes.band_rows`; the bands' starts are counted in XLA before the kernel). With split > 0
# a program takes several tile columns: fewer [split, M, N] f32 partials to write and add in XLA
# (64 MB each way at M = 64 with split 0), the bands keeping the program count up.
Bd = lambda *a, band: BlockSizes(*a, band_rows=band)
# The int8 Mosaic GPU kernel (Hopper): weight rows per CTA tile, K per TMA step, shared-memory slots;
# timed as the tuned row's Triton blocks with these tiles added.
Mo = MosaicTiles
# (kernel, codec, sparsity, M, activation dtype) -> candidates; None is the tuned table's choice.
# A block_m >= 8 is the tl.dot path (M padded to 16); block_m = 1 the batch-1 FMA path.
# M = 2..16 run the same dot-path kernel, so dot-path candidates are timed at M = 16.
CANDIDATES = {
    ("int8_matmul", "int8", 0.0, 1, "bfloat16"): [
        None, B(1, 16, 256, 1, 4, 3), B(1, 16, 256, 2, 4, 3), B(1, 8, 512, 1, 4, 3), B(1, 32, 256, 1, 8, 3),
        B(1, 16, 512, 1, 4, 2), B(1, 4, 1024, 1, 4, 2), B(1, 16, 256, 1, 4, 1), B(1, 32, 128, 1, 4, 3),
        B(1, 64, 128, 2, 8, 3), B(16, 128, 256, 2, 8, 4), B(16, 64, 256, 8, 4, 3),
        Mo(64, 128, 6), Mo(64, 256, 6), Mo(64, 256, 4), Mo(128, 128, 6)],
    ("int8_matmul", "int8", 0.0, 1, "float32"): [None, Mo(64, 256, 6), Mo(64, 128, 6)],
    ("int8_matmul", "int8", 0.0, 16, "bfloat16"): [
        None, B(16, 64, 256, 2, 8, 3), B(16, 32, 256, 2, 4, 3), B(16, 32, 256, 4, 4, 3), B(16, 64, 512, 2, 8, 3),
        B(16, 128, 256, 2, 8, 3), B(16, 128, 256, 4, 8, 3), B(16, 128, 256, 2, 8, 4), B(16, 128, 512, 2, 8, 3),
        B(16, 128, 128, 2, 8, 6), B(16, 64, 128, 4, 8, 6), B(16, 128, 256, 4, 8, 5),
        S(16, 64, 256, 2, 4, 3), S(16, 128, 256, 2, 8, 3), S(16, 128, 256, 2, 4, 3), S(16, 64, 128, 4, 4, 4),
        B(16, 64, 256, 8, 4, 3), B(16, 128, 256, 8, 8, 3), B(16, 32, 512, 8, 4, 3), B(16, 64, 256, 4, 4, 4),
        Mo(64, 128, 4), Mo(64, 128, 6), Mo(64, 256, 4), Mo(64, 256, 6), Mo(128, 128, 6), Mo(128, 256, 4)],
    ("int8_matmul", "int8", 0.0, 16, "float32"): [None, B(16, 128, 256, 2, 8, 3), S(16, 128, 256, 2, 8, 3),
                                                  Mo(64, 128, 6), Mo(64, 256, 4), Mo(128, 128, 4)],
    ("int8_matmul", "int8", 0.0, 64, "float32"): [None, B(64, 64, 128, 2, 8, 3), B(64, 64, 128, 1, 8, 3),
                                                  S(64, 64, 128, 2, 8, 3), S(64, 128, 128, 2, 8, 3),
                                                  B(64, 32, 128, 2, 4, 3), B(64, 64, 64, 2, 4, 4)],
    ("int8_matmul", "int8", 0.0, 64, "bfloat16"): [None, B(64, 64, 128, 2, 8, 3), B(64, 128, 128, 2, 8, 3),
                                                   B(64, 128, 256, 2, 8, 3), S(64, 128, 128, 2, 8, 3),
                                                   B(64, 64, 128, 2, 4, 4), Mo(64, 128, 6), Mo(64, 256, 4),
                                                   Mo(128, 128, 6)],
    # Bitmask kernels, block_k = 256 = the tiles' columns and one tile per program (split 0):
    # num_stages 2 is the software-pipelined walk, 1 the plain one (third GPU session). The banded
    # candidates (fourth session, not yet timed) come first, so a sweep cut short by its budget
    # still reaches them.
    ("bitmask_matmul", "bitmask_int8", 0.5, 16, "bfloat16"): [None, Bd(16, 16, 256, 0, 2, 2, band=64),
                                                              Bd(16, 8, 256, 0, 1, 1, band=64),
                                                              Bd(16, 8, 256, 0, 1, 1, band=32),
                                                              Bd(16, 16, 256, 8, 2, 1, band=64),
                                                              B(16, 16, 256, 0, 2, 2), B(16, 16, 256, 0, 2, 1),
                                                              B(16, 16, 256, 0, 4, 2), B(16, 16, 256, 0, 4, 1),
                                                              B(16, 8, 256, 0, 2, 2), B(16, 8, 256, 0, 1, 1)],
    ("bitmask_matmul", "bitmask_int8", 0.5, 1, "bfloat16"): [None, Bd(1, 8, 256, 0, 1, 2, band=64),
                                                             Bd(1, 4, 256, 0, 1, 1, band=64),
                                                             Bd(1, 4, 256, 0, 1, 1, band=32),
                                                             Bd(1, 4, 256, 0, 1, 2, band=64),
                                                             Bd(1, 8, 256, 0, 2, 2, band=64),
                                                             Bd(1, 2, 256, 0, 1, 1, band=32), B(1, 16, 256, 0, 2, 2),
                                                             B(1, 16, 256, 0, 2, 1), B(1, 8, 256, 0, 1, 2),
                                                             B(1, 4, 256, 0, 1, 2)],
    # The broadcast path (block_m < 8) on one or two warps at M = 4, against the 16-row dot row.
    ("bitmask_matmul", "bitmask_int8", 0.5, 4, "bfloat16"): [None, Bd(4, 4, 256, 0, 1, 2, band=64),
                                                             Bd(4, 4, 256, 0, 1, 1, band=64), B(4, 4, 256, 0, 1, 2),
                                                             B(4, 4, 256, 0, 1, 1), B(4, 4, 256, 0, 2, 2),
                                                             B(4, 8, 256, 0, 2, 2)],
    ("bitmask_matmul", "bitmask_int8", 0.5, 64, "bfloat16"): [None, Bd(64, 16, 256, 0, 4, 2, band=128),
                                                              Bd(64, 16, 256, 0, 4, 2, band=64),
                                                              Bd(64, 16, 256, 8, 4, 1, band=64),
                                                              Bd(64, 16, 256, 4, 4, 1, band=32),
                                                              B(64, 16, 256, 0, 4, 2), B(64, 16, 256, 0, 4, 1),
                                                              B(64, 16, 256, 0, 2, 2), B(64, 8, 256, 0, 4, 2)],
    # 3 x 64 rows: f32 activations at 22 <= M <= 64 run as bf16 [hi; mid; lo] rows (`_api`).
    ("bitmask_matmul", "bitmask_int8", 0.5, 192, "bfloat16"): [None, Bd(64, 16, 256, 0, 4, 2, band=64),
                                                               Bd(64, 16, 256, 8, 4, 1, band=64),
                                                               B(64, 16, 256, 0, 4, 2), B(64, 16, 256, 0, 4, 1),
                                                               B(64, 32, 128, 1, 4, 1)],
    # The transposed (backward) kernel: the dx of `ltjax.matmul`; its rows so far come from the
    # offline compile. num_stages 2 pipelines each tile row's walk (third GPU session; not yet timed).
    ("bitmask_matmul_t", "bitmask_int8", 0.5, 16, "bfloat16"): [None, B(16, 16, 256, 0, 4, 2), B(16, 16, 256, 0, 2, 2),
                                                                B(16, 16, 256, 0, 2, 1), B(16, 32, 256, 0, 4, 2)],
    ("bitmask_matmul_t", "bitmask_int8", 0.5, 64, "bfloat16"): [None, B(64, 16, 256, 0, 8, 2)],  # 4 warps spill
    ("int8_matmul_t", "int8", 0.0, 16, "bfloat16"): [None, B(16, 64, 256, 1, 4, 3), B(16, 128, 256, 2, 8, 3),
                                                     B(16, 64, 128, 2, 4, 4)],
    ("bitmask_unpack_t", "bitmask_int8", 0.5, 0, "float32"): [None, Bd(1, 32, 128, 0, 2, 1, band=64),
                                                              B(1, 32, 128, 0, 4, 1), B(1, 16, 128, 0, 4, 1),
                                                              B(1, 16, 128, 0, 2, 1), B(1, 32, 128, 0, 2, 1),
                                                              B(1, 16, 64, 0, 4, 1), B(1, 8, 256, 0, 2, 2),
                                                              B(1, 16, 256, 0, 4, 2)],
    ("bitmask_unpack", "bitmask_int8", 0.5, 0, "float32"): [None, Bd(1, 8, 256, 0, 2, 2, band=64),
                                                            Bd(1, 8, 256, 0, 2, 1, band=64),
                                                            Bd(1, 4, 256, 0, 1, 1, band=64),
                                                            Bd(1, 4, 256, 0, 1, 1, band=32), B(1, 16, 128, 0, 4, 1),
                                                            B(1, 8, 128, 0, 4, 1), B(1, 16, 128, 0, 2, 1),
                                                            B(1, 32, 128, 0, 4, 1), B(1, 16, 64, 0, 4, 1),
                                                            B(1, 8, 256, 0, 2, 2), B(1, 16, 256, 0, 4, 2)],
    ("int8_dequant_t", "int8", 0.0, 0, "float32"): [None, B(1, 64, 256, 1, 8, 1), B(1, 32, 128, 1, 4, 1),
                                                    B(1, 128, 128, 1, 8, 1)],
    ("int8_dequant", "int8", 0.0, 0, "float32"): [None],
}
# Largest relative difference from the tuned configuration's output a candidate may show and
# still be eligible for --write-tuned (bf16 outputs round at 2^-8; f32 sums reorder).
ELIGIBLE = {"bfloat16": 2e-2, "float32": 1e-4}
UNPACK = {"bitmask_unpack": (lp.bitmask_unpack, False), "bitmask_unpack_t": (lp.bitmask_unpack, True),
          "int8_dequant": (lp.int8_dequant, False), "int8_dequant_t": (lp.int8_dequant, True)}


def bs_dict(bs: BlockSizes) -> dict:
    return dict(block_m=bs.block_m, block_n=bs.block_n, block_k=bs.block_k, split=bs.split,
                num_warps=bs.num_warps, num_stages=bs.num_stages, swap_ab=bs.swap_ab,
                mosaic=None if bs.mosaic is None else dataclasses.asdict(bs.mosaic), band_rows=bs.band_rows)


def tuned_rows(rows: list[dict]) -> list[dict]:
    """The fastest eligible row of each sweep group, as tuned-table rows (`ltjax.pallas._config.load_tuned`).

    Group -> table key: matmul rows -> (kernel, the activation dtype they were measured with,
    M); unpack kernels -> (kernel, "*", any M). Keyed by dtype because a block fitting shared
    memory with bf16 activations may not with f32 ones (seen on an H200: 260 KiB requested).
    """
    best: dict[tuple, dict] = {}
    for r in rows:
        if "t_us" not in r or r["rel_diff_vs_tuned"] is None or r["rel_diff_vs_tuned"] > ELIGIBLE[r["x_dtype"]]:
            continue
        g = (r["kernel"], r["codec"], r["M"], r["x_dtype"])
        if g not in best or r["t_us"] < best[g]["t_us"]:
            best[g] = r
    out = []
    for (kernel, _, m, xdt), r in sorted(best.items()):
        dtype, max_m = ("*", 1 << 30) if m == 0 else (xdt, m)
        out.append(dict(kernel=kernel, dtype=dtype, max_m=max_m, block_sizes={f: r[f] for f in bs_dict(B())},
                        t_us=r["t_us"], measured_at=dict(M=m, x_dtype=xdt, K=r["K"], N=r["N"])))
    return out


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0], "pallas_sweep")
    p.add_argument("--size", type=int, default=8192, help="K = N (default 8192)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--budget", type=float, default=90.0, help="seconds for the whole sweep")
    p.add_argument("--only", nargs="+", metavar="PREFIX",
                   help="sweep only the groups whose 'kernel/M/dtype' (e.g. int8_matmul/64/float32) starts "
                        "with one of these")
    p.add_argument("--write-tuned", metavar="PATH",
                   help="write the fastest eligible candidate of each group as a tuned-table file "
                        "($LTJAX_PALLAS_TUNED reads it)")
    a = p.parse_args(argv)
    a.out = _common.out_path(a, "pallas_sweep")
    size, layers, reps = (256, 2, 2) if a.quick else (a.size, a.layers, a.reps)
    if jax.default_backend() != "gpu" and not a.quick:
        print(f"pallas_sweep times native kernels: the backend is {jax.default_backend()!r}, not 'gpu' "
              "(--quick runs a tiny interpret-mode smoke instead)")
        return 2
    t_end = time.monotonic() + a.budget
    rng = np.random.default_rng(0)
    rows, skipped = [], []
    save = lambda complete: _common.write_json(a.out, _common.result(
        "pallas_sweep", a.quick, complete=complete, size=size, layers=layers, reps=reps,
        GBps_counts="matmul rows: compressed weight bytes; unpack rows (M = 0): weight bytes + f32 output bytes",
        copy_baseline=copy, rows=rows, skipped=skipped))
    cts_of = {}
    interpret = None if a.quick else False
    groups = {key: c for key, c in CANDIDATES.items()
              if not a.only or f"{key[0]}/{key[3]}/{key[4]}".startswith(tuple(a.only))}
    def time_copy() -> float:  # the unpack rows' baseline: read + write of the dense f32 output, per layer
        dense = replicate(jnp.asarray(rng.standard_normal((size, size), dtype=np.float32)), layers)
        f_copy = jax.jit(lambda arrays, s: [w + s for w in arrays])
        return _common.median_time(lambda: f_copy(dense, jnp.float32(1.0)), reps=reps) / layers

    def copy_of(times: list[float]) -> dict:
        t = min(times)
        return dict(t_copy_us=t * 1e6, copy_GBps=2 * size * size * 4 / t / 1e9, t_copy_us_each=[u * 1e6 for u in times])

    copy_times = [time_copy()] if any(key[0] in UNPACK for key in groups) else []
    copy = copy_of(copy_times) if copy_times else {}
    for (kernel, codec, sparsity, m, xdt), cands in groups.items():
        if (codec, sparsity) not in cts_of:
            cts_of.clear()  # one weight set on the device at a time
            cts_of[(codec, sparsity)] = replicate(jax.device_put(pack(make_weight(rng, size, size, sparsity), codec)),
                                                  layers)
        cts = cts_of[(codec, sparsity)]
        x = jnp.asarray(rng.standard_normal((max(m, 1), size), dtype=np.float32)).astype(xdt)
        ref = None
        for bs in cands[:2] if a.quick else cands:
            tuned = bs is None
            if tuned:
                bs = lp.get_block_sizes(kernel, max(m, 1), x.dtype)
            elif isinstance(bs, MosaicTiles):
                bs = dataclasses.replace(lp.get_block_sizes(kernel, max(m, 1), x.dtype), mosaic=bs)
            row = dict(kernel=kernel, codec=codec, sparsity=sparsity, M=m, x_dtype=xdt, K=size, N=size, tuned=tuned,
                       **bs_dict(bs))
            if time.monotonic() > t_end:
                skipped.append(row)
                continue
            why = (why_not_mosaic(x, cts[0], bs.mosaic, interpret=bool(interpret)) if bs.mosaic is not None
                   else None)
            if why is not None:  # it would time the Triton fallback under a Mosaic row
                row.update(not_run=why)
                rows.append(row)
                print(row, flush=True)
                continue
            if kernel in UNPACK:
                fn, transposed = UNPACK[kernel]
                f = jax.jit(lambda cs, fn=fn, transposed=transposed, bs=bs: [
                    fn(c, interpret=interpret, transposed=transposed, block_sizes=bs) for c in cs])
                args, moved = (cts,), cts[0].nbytes + size * size * 4
            else:  # a square weight: the transposed kernel chains like the forward one
                op = lp.matmul_t if kernel.endswith("_t") else lp.matmul
                f = chain(lambda y, ct, bs=bs, op=op: op(y, ct, interpret=interpret, block_sizes=bs))
                args, moved = (x, cts), cts[0].nbytes
            try:
                out = f(*args)
                out = out[0] if isinstance(out, list) else out
                ref = out if tuned else ref
                t = _common.median_time(lambda: f(*args), reps=reps) / layers
                row.update(t_us=t * 1e6, GBps=moved / t / 1e9,
                           rel_diff_vs_tuned=rel_diff(out, ref) if ref is not None else None)
                if kernel in UNPACK and copy:  # provisional until the copy is timed again at the end
                    row.update(t_copy_us=copy["t_copy_us"], copy_GBps=copy["copy_GBps"],
                               frac_of_copy=row["GBps"] / copy["copy_GBps"])
            except Exception as e:  # a candidate that fails to compile is a finding, not the end of the sweep
                row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(row)
            print(row, flush=True)
            save(False)
    if copy_times:
        # Timed again at the end: the first point of a process has read slow on GPUs (a copy at 214-219 us
        # against 173-179 us later in the third session), so the unpack rows use the faster of the two.
        copy_times.append(time_copy())
        copy = copy_of(copy_times)
        for row in rows:
            if row["kernel"] in UNPACK and "GBps" in row:
                row.update(t_copy_us=copy["t_copy_us"], copy_GBps=copy["copy_GBps"],
                           frac_of_copy=row["GBps"] / copy["copy_GBps"])
    print(f"wrote {save(True)}")
    if a.write_tuned:
        env = _common.environment()
        table = dict(device=env["device_name"], date=env["date"], commit=env["git"]["commit"],
                     sweep=os.path.basename(a.out), rows=tuned_rows(rows))
        print(f"wrote {_common.write_json(a.write_tuned, table)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
