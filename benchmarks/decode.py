"""SmolLM2 decode on this machine: where a token's time goes, against the machine's read bandwidth.

    python -m benchmarks.decode [--quick] [--out PATH] [--rounds 5] [--steps 16] [--chunk 8]
                                [--rows dense,int8,int4]

First the machine's read bandwidth, measured in the same run: a jitted sum over a 1 GiB f32
array (XLA:CPU splits it over the cores), the best of a few reads. Then, for each row (dense
f32, `--codec int8`, `--codec int4` at 32-groups with the int8 embedding, each the unmodified
`models.llama` model under ``ltjax.nn.intercept()``, batch 1, dense f32 KV cache), in interleaved
rounds (one call per row per round, the order rotating; medians over rounds):

* ``step``: the decode time of `models.generate.generate` (``--steps`` new tokens after a
  one-token prompt, ``--chunk`` steps a dispatch, as ``models.generate`` runs them), per token;
* ``dispatch``: one call of a compiled program taking the row's weights and doing nothing with
  them (what each dispatch of a step or a chunk pays to hand ~700 arrays to XLA);
* ``matmuls``: the model's 210 projections alone, each ``x[1, K] @ W`` on the row's own weights in
  one jitted program (`ltjax.matmul` for compressed ones, ``x @ W`` for dense), per token, with
  the weight bytes it reads, its GB/s and the fraction of the measured bandwidth;
* ``head``: the tied LM head (``nn.Embed.attend`` on the row's embedding, under the intercept);
* ``rest``: step - matmuls - head (attention over the cache, norms, RoPE, sampling, dispatch).

The decode step's whole weight stream (every byte the step reads once per token: projections
and head) over the step time is the row's streaming figure against the bandwidth (issue 23's
target: 70%). With a ``llama-bench`` binary (``LLAMA_BENCH=path`` or on PATH; optional, never a
dependency), llama.cpp's tg on the same GGUF file runs in the same rounds (``-t`` = this
machine's cores); without one the JSON says it was not found. ``--quick``: the tiny random
model, a 64 MiB bandwidth read, two rounds (a smoke test; its figures are not figures).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common as C
from models import generate as gen, llama, loaders, perplexity as ppl

ROWS = ("dense", "int8", "int4")
CODEC = {"dense": "none", "int8": "int8", "int4": "int4"}


def read_bandwidth(nbytes: int, reads: int = 5) -> dict:
    """Bytes/s of a jitted f32 sum over ``nbytes`` (the best of ``reads``), and the times."""
    n = nbytes // 4
    a = jax.block_until_ready(jnp.ones((n,), jnp.float32))
    f = jax.jit(jnp.sum)
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(reads):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t0)
    return {"bytes": n * 4, "seconds": ts, "gb_s": n * 4 / min(ts) / 1e9, "how": "jitted jnp.sum over f32"}


def projections(params) -> list[tuple[str, object]]:
    """``[(path, kernel)]``: every Dense kernel of the layers, in the order a decode step reads them."""
    out = []
    for i in range(sum(k.startswith("layers_") for k in params)):
        layer = params[f"layers_{i}"]
        for block, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            out += [(f"layers_{i}/{block}/{n}/kernel", layer[block][n]["kernel"]) for n in names]
    return out


def weight_bytes(w) -> int:
    import ltjax  # pylint: disable=import-outside-toplevel

    return int(w.nbytes) if isinstance(w, ltjax.CompressedTensor) else int(np.asarray(w).nbytes)


def matmul_chain(kernels: list):
    """A jitted ``() -> scalar`` running ``x[1, K] @ W`` for every kernel (kept live by a sum)."""
    import ltjax  # pylint: disable=import-outside-toplevel

    ks = [k.shape[0] for k in kernels]
    xs = [jnp.full((1, k), 0.01, jnp.float32) for k in ks]

    @jax.jit
    def run(ws, xs):
        acc = jnp.zeros((), jnp.float32)
        for w, x in zip(ws, xs):
            y = ltjax.matmul(x, w) if isinstance(w, ltjax.CompressedTensor) else x @ w
            acc = acc + y[0, 0]
        return acc

    return lambda: run(kernels, xs)


def head_call(embedding, dim: int, codec: str):
    """A jitted ``() -> logits`` of the tied LM head (``nn.Embed.attend``) on ``embedding``."""
    import ltjax  # pylint: disable=import-outside-toplevel

    vocab = embedding.shape[0]
    mod = nn.Embed(vocab, dim)
    x = jnp.full((1, dim), 0.01, jnp.float32)

    @jax.jit
    def run(e, x):
        if codec == "none":
            return mod.apply({"params": {"embedding": e}}, x, method="attend")
        with ltjax.nn.intercept():
            return mod.apply({"params": {"embedding": e}}, x, method="attend")

    return lambda: run(embedding, x)


def llama_bench() -> str | None:
    """The ``llama-bench`` binary (``LLAMA_BENCH``, else PATH), or None."""
    path = os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench")
    return path if path and os.access(path, os.X_OK) else None


def llama_bench_tg(binary: str, model: str, tokens: int, threads: int) -> float:
    """llama.cpp's decode tokens/s (``-p 0 -n tokens``, one repetition) on ``model``."""
    cmd = [binary, "-m", model, "-p", "0", "-n", str(tokens), "-t", str(threads), "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()[-400:]}")
    rows = json.loads(out.stdout)
    tg = [r for r in rows if int(r.get("n_gen", 0)) > 0]
    if not tg:
        raise RuntimeError(f"{' '.join(cmd)} printed no tg row: {out.stdout[:400]}")
    return float(tg[0]["avg_ts"])


def load(quick: bool):
    """``(dense params, config, source, gguf path or None)``."""
    if quick:
        return llama.init_params(gen.TINY_CONFIG, 0), gen.TINY_CONFIG, "random-init tiny model (--quick)", None
    path = loaders.find_smollm2_gguf()
    if path is not None:
        quant, config = loaders.load_gguf(path, keep_quantized=True)
        return ppl.decompressed(quant), config, f"SmolLM2-135M-Instruct ({path})", path
    config = loaders.SMOLLM2_CONFIG
    return llama.init_params(config, 0), config, "random-init model of SmolLM2-135M's shape (wheel absent)", None


def main(argv=None) -> int:
    p = C.parser(__doc__.splitlines()[0], "decode")
    p.add_argument("--rounds", type=int, help="timing rounds (default 5, --quick 2)")
    p.add_argument("--steps", type=int, help="decode steps per row per round (default 16, --quick 4)")
    p.add_argument("--chunk", type=int, default=8, help="decode steps per dispatch (default %(default)s)")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of %(default)s")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (4 if args.quick else 16)
    names = [r for r in args.rows.split(",") if r]
    if rounds < 1 or steps < 1 or args.chunk < 1 or not names or any(r not in ROWS for r in names):
        p.error(f"--rounds {rounds}, --steps {steps} and --chunk {args.chunk} must be >= 1, --rows {args.rows!r} "
                f"a subset of {ROWS}")
    import ltjax  # pylint: disable=import-outside-toplevel

    load0, t0 = C.loadavg(), time.perf_counter()
    bw = read_bandwidth(64 << 20 if args.quick else 1 << 30)
    print(f"read bandwidth: {bw['gb_s']:.1f} GB/s ({bw['how']}, {bw['bytes'] >> 20} MiB, best of {len(bw['seconds'])})")
    dense, config, source, gguf = load(args.quick)
    calls, info = {}, {}
    for name in names:
        codec = CODEC[name]
        params = jax.device_put(gen.compress_params(dense, codec))
        fn = gen.make_apply_fn(config, codec)
        kernels = [w for _, w in projections(params)]
        emb = params["embed"]["embedding"]
        calls[f"{name} step"] = _generate(params, config, fn, steps, args.chunk)
        calls[f"{name} dispatch"] = _dispatch(params)
        calls[f"{name} matmuls"] = matmul_chain(kernels)
        calls[f"{name} head"] = head_call(emb, config.dim, codec)
        mm_bytes, head_bytes = sum(weight_bytes(w) for w in kernels), weight_bytes(emb)
        info[name] = {"matmul_weight_bytes": mm_bytes, "head_weight_bytes": head_bytes,
                      "path": gen.op_path(params)["path"] if codec != "none" else "dense"}
    binary = llama_bench() if gguf is not None else None
    llama_cpp = {"binary": binary, "model": gguf, "tok_s_rounds": []}
    if binary is None:
        llama_cpp["note"] = ("no GGUF file (random or tiny model)" if gguf is None else
                             "no llama-bench binary (set LLAMA_BENCH=path or put llama-bench on PATH)")
    for fn in calls.values():
        jax.block_until_ready(fn())  # compile and warm
        jax.block_until_ready(fn())
    samples = {k: [] for k in calls}
    keys = list(calls)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            s = time.perf_counter()
            own = jax.block_until_ready(calls[k]())  # a float: the call timed itself
            samples[k].append(own if isinstance(own, float) else time.perf_counter() - s)
        if binary is not None:
            try:
                llama_cpp["tok_s_rounds"].append(llama_bench_tg(binary, gguf, 64, os.cpu_count() or 1))
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                llama_cpp["error"], binary = str(e), None
    rows = []
    for name in names:
        step = statistics.median(samples[f"{name} step"]) / steps
        mm, head = statistics.median(samples[f"{name} matmuls"]), statistics.median(samples[f"{name} head"])
        dispatch = statistics.median(samples[f"{name} dispatch"])
        i = info[name]
        stream = i["matmul_weight_bytes"] + i["head_weight_bytes"]
        rows.append({"row": name, **i, "step_s": step, "tok_s": 1 / step, "matmuls_s": mm, "head_s": head,
                     "dispatch_s": dispatch, "chunk": args.chunk,
                     "rest_s": step - mm - head, "matmuls_gb_s": i["matmul_weight_bytes"] / mm / 1e9,
                     "matmuls_fraction_of_bandwidth": i["matmul_weight_bytes"] / mm / 1e9 / bw["gb_s"],
                     "step_stream_gb_s": stream / step / 1e9,
                     "step_fraction_of_bandwidth": stream / step / 1e9 / bw["gb_s"],
                     "rounds": {k.split(" ", 1)[1]: samples[k] for k in samples if k.startswith(name + " ")}})
    if llama_cpp["tok_s_rounds"]:
        llama_cpp["tok_s"] = statistics.median(llama_cpp["tok_s_rounds"])
    print(f"{source}; batch 1; {rounds} rounds, {steps} decode steps a round, {args.chunk} a dispatch; "
          f"load average {load0} -> {C.loadavg()}")
    print(C.table(["row", "path", "tok/s", "step ms", "matmuls ms", "matmul GB/s", "of bw", "head ms", "rest ms",
                   "step stream GB/s", "of bw", "dispatch ms"],
                  [[r["row"], r["path"], f"{r['tok_s']:.1f}", f"{r['step_s'] * 1e3:.2f}", f"{r['matmuls_s'] * 1e3:.2f}",
                    f"{r['matmuls_gb_s']:.1f}", f"{r['matmuls_fraction_of_bandwidth']:.0%}",
                    f"{r['head_s'] * 1e3:.2f}", f"{r['rest_s'] * 1e3:.2f}", f"{r['step_stream_gb_s']:.1f}",
                    f"{r['step_fraction_of_bandwidth']:.0%}", f"{r['dispatch_s'] * 1e3:.2f}"] for r in rows]))
    if "tok_s" in llama_cpp:
        print(f"llama.cpp ({llama_cpp['binary']}) tg64 on {gguf}: {llama_cpp['tok_s']:.1f} tok/s (median of rounds)")
    else:
        print(f"llama.cpp: not run ({llama_cpp.get('error') or llama_cpp['note']})")
    res = C.result("decode", args.quick, model=source, bandwidth=bw, rounds=rounds, steps=steps, chunk=args.chunk,
                   rows=rows,
                   llama_cpp=llama_cpp, loadavg_start=load0, loadavg_end=C.loadavg(),
                   ltjax_version=ltjax.__version__, seconds=time.perf_counter() - t0)
    print(f"wrote {C.write_json(C.out_path(args, 'decode'), res)}")
    return 0


def _generate(params, config, apply_fn, steps: int, chunk: int):
    """A callable returning the decode seconds of `models.generate.generate` (``steps`` tokens after the first)."""
    prompt = np.zeros((1, 1), np.int32)

    def run() -> float:
        _, stats = gen.generate(params, config, prompt, steps + 1, apply_fn=apply_fn, warmup=False, chunk=chunk)
        return float(stats["decode_s"])

    return run


def _dispatch(params):
    """A callable: one call of a compiled program that takes ``params`` and does nothing with them."""
    f = jax.jit(lambda p, i: i + 1).lower(params, jnp.int32(0)).compile()
    i = jnp.int32(0)
    return lambda: f(params, i)


if __name__ == "__main__":
    raise SystemExit(main())
