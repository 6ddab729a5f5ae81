"""Block-size sweep of the fused Pallas matmul kernels on a GPU: the data behind `TUNED_BLOCK_SIZES`.

For each kernel (int8, bitmask_int8 at 50% sparsity), M and candidate `BlockSizes` it times a
jitted chain of ``--layers`` forward matmuls over distinct weight copies (as
`benchmarks.matmul` does) with bf16 activations, and checks each candidate's output against
the tuned configuration's. Rows are written to the JSON as they are measured; ``--budget``
seconds bounds the whole sweep (candidates left when it runs out are listed as skipped).

    PYTHONPATH=. python -m benchmarks.pallas_sweep --out OUT.json        # GPU only
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import ltjax.pallas as lp
from benchmarks import _common
from benchmarks.matmul import chain, make_weight, rel_diff, replicate
from ltjax._format import pack
from ltjax.pallas import BlockSizes

B = BlockSizes
# (codec, sparsity, M) -> candidates; None is the tuned table's choice.
CANDIDATES = {
    ("int8", 0.0, 1): [None, B(1, 32, 256, 1, 4, 3), B(1, 8, 512, 1, 4, 3), B(1, 16, 512, 1, 8, 3),
                       B(1, 32, 128, 1, 4, 4), B(1, 64, 128, 1, 8, 3), B(1, 8, 256, 1, 2, 3), B(1, 4, 1024, 1, 4, 2)],
    ("int8", 0.0, 16): [None, B(16, 64, 128, 1, 4, 3), B(16, 32, 256, 1, 4, 3), B(16, 16, 256, 1, 4, 4),
                        B(16, 64, 256, 1, 8, 3), B(16, 128, 128, 1, 8, 3), B(16, 32, 128, 1, 4, 5)],
    ("bitmask_int8", 0.5, 1): [None, B(1, 8, 256, 0, 4, 1), B(1, 32, 256, 0, 4, 1), B(1, 32, 256, 0, 8, 1),
                               B(1, 16, 256, 0, 2, 1), B(1, 64, 256, 0, 8, 1), B(1, 16, 128, 0, 4, 1),
                               B(1, 16, 256, 16, 4, 1)],
    ("bitmask_int8", 0.5, 16): [None, B(16, 32, 256, 0, 4, 1), B(16, 8, 256, 0, 4, 1), B(16, 16, 256, 0, 8, 1),
                                B(16, 32, 256, 0, 8, 1), B(16, 16, 128, 0, 4, 1)],
}


def bs_dict(bs: BlockSizes) -> dict:
    return dict(block_m=bs.block_m, block_n=bs.block_n, block_k=bs.block_k, split=bs.split,
                num_warps=bs.num_warps, num_stages=bs.num_stages)


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[0], "benchmarks/results/pallas_sweep.json")
    p.add_argument("--size", type=int, default=8192, help="K = N (default 8192)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--budget", type=float, default=90.0, help="seconds for the whole sweep")
    a = p.parse_args(argv)
    size, layers, reps = (256, 2, 2) if a.quick else (a.size, a.layers, a.reps)
    if jax.default_backend() != "gpu" and not a.quick:
        print(f"pallas_sweep times native kernels: the backend is {jax.default_backend()!r}, not 'gpu' "
              "(--quick runs a tiny interpret-mode smoke instead)")
        return 2
    t_end = time.monotonic() + a.budget
    rng = np.random.default_rng(0)
    rows, skipped = [], []
    save = lambda complete: _common.write_json(a.out, _common.result(
        "pallas_sweep", a.quick, complete=complete, size=size, layers=layers, reps=reps, x_dtype="bfloat16",
        rows=rows, skipped=skipped))
    cts_of = {}
    for (codec, sparsity, m), cands in CANDIDATES.items():
        if (codec, sparsity) not in cts_of:
            cts_of.clear()  # one weight set on the device at a time
            cts_of[(codec, sparsity)] = replicate(jax.device_put(pack(make_weight(rng, size, size, sparsity), codec)),
                                                  layers)
        cts = cts_of[(codec, sparsity)]
        x = jnp.asarray(rng.standard_normal((m, size), dtype=np.float32)).astype(jnp.bfloat16)
        ref = None
        for bs in cands[:2] if a.quick else cands:
            tuned = bs is None
            if tuned:
                bs = lp.get_block_sizes("int8_matmul" if codec == "int8" else "bitmask_matmul", m, x.dtype)
            if time.monotonic() > t_end:
                skipped.append(dict(codec=codec, M=m, **bs_dict(bs)))
                continue
            f = chain(lambda y, ct, bs=bs: lp.matmul(y, ct, interpret=False if not a.quick else None,
                                                     block_sizes=bs))
            row = dict(codec=codec, sparsity=sparsity, M=m, K=size, N=size, tuned=tuned, **bs_dict(bs))
            try:
                out = f(x, cts)
                ref = out if tuned else ref
                t = _common.median_time(lambda: f(x, cts), reps=reps) / layers
                row.update(t_us=t * 1e6, weight_GBps=cts[0].nbytes / t / 1e9,
                           rel_diff_vs_tuned=rel_diff(out, ref) if ref is not None else None)
            except Exception as e:  # a candidate that fails to compile is a finding, not the end of the sweep
                row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(row)
            print(row, flush=True)
            save(False)
    print(f"wrote {save(True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
