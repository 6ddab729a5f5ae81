"""Compressed activation residuals on a ReLU MLP trained on scikit-learn's digits.

Three variants of one model, trained from the same initial parameters on the same
batches with optax adam:

  dense   jax.nn.relu + x @ W + b                        (XLA's default residuals)
  relu    ltjax relu (1-bit mask) + x @ W + b
  sparse  ltjax relu + ltjax sparse_dense for every layer whose input is post-ReLU,
          through value_and_grad_exact (dense rerun on overflow: exact gradients)

Measured (nothing assumed):
  * loss curves (bit-equality with dense is checked),
  * post-ReLU sparsity of each hidden layer at the start and end of training,
  * compiled temp memory (`memory_analysis().temp_size_in_bytes`) of the whole training
    step (grad + adam), at two depths; the per-hidden-layer slope of temp vs depth is the
    memory each extra hidden layer's saved activations cost,
  * the ReLU residual alone: a chain h <- relu(h @ W_l), grad w.r.t. the input only (so
    the backward needs nothing but the ReLU residuals and the weights), temp slope vs
    depth for jax.nn.relu and ltjax relu,
  * median step time of each variant.

Usage: python -m benchmarks.activations [--steps 150] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from benchmarks import _common as C
from ltjax import _activations as A


def init_params(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (a, b), jnp.float32) * np.sqrt(2.0 / a),
             "b": jnp.zeros((b,), jnp.float32)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def make_loss(variant, capacity):
    act = jax.nn.relu if variant == "dense" else A.relu

    def layer(i, h, p):
        if variant == "sparse" and i > 0:  # input of layer 0 is the data batch
            return A.sparse_dense(h, p["w"], p["b"], capacity=capacity)
        return A.dense_reference(h, p["w"], p["b"])

    def loss(params, x, y):
        h = x
        for i, p in enumerate(params[:-1]):
            h = act(layer(i, h, p))
        logits = layer(len(params) - 1, h, params[-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return loss


def hidden_activations(params, x):
    h, out = x, []
    for p in params[:-1]:
        h = jax.nn.relu(A.dense_reference(h, p["w"], p["b"]))
        out.append(h)
    return out


def sparsity(params, x):
    return [float(jnp.mean(h == 0)) for h in hidden_activations(params, x)]


def temp_bytes(fn, *args):
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def step_fn(loss, opt):
    def step(params, opt_state, x, y):
        l, g = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, l
    return step


def relu_chain_temp(act, depth, batch, width):
    def f(x, ws):
        h = x
        for w in ws:
            h = act(h @ w)
        return jnp.sum(h)
    x = jax.ShapeDtypeStruct((batch, width), jnp.float32)
    ws = [jax.ShapeDtypeStruct((width, width), jnp.float32)] * depth
    return temp_bytes(jax.grad(f), x, ws)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=3, help="hidden layers")
    ap.add_argument("--mem-batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", help="JSON output path "
                    "(default benchmarks/results/<date>-<backend>[-quick]/activations.json)")
    ap.add_argument("--quick", action="store_true", help="CI-sized run: 10 steps, batch 256, width 128")
    args = ap.parse_args(argv)
    args.out = C.out_path(args, "activations")
    if args.quick:
        args.steps, args.batch, args.width, args.mem_batch = 10, 256, 128, 512

    digits = load_digits()
    data_x = jnp.asarray(digits.data / 16.0, jnp.float32)
    data_y = jnp.asarray(digits.target, jnp.int32)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, data_x.shape[0], args.batch) for _ in range(args.steps)]

    sizes = [64] + [args.width] * args.depth + [10]
    params0 = init_params(jax.random.key(0), sizes)
    sp0 = sparsity(params0, data_x)
    capacity = max(A.suggest_capacity(h) for h in hidden_activations(params0, data_x))
    opt = optax.adam(args.lr)

    results = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
               "machine": platform.processor() or platform.machine(),
               "jax": jax.__version__, "config": vars(args), "layer_sizes": sizes,
               "capacity": capacity, "sparsity_init": sp0}

    # ---------------- compiled memory of the whole step, and its slope vs depth
    mem = {}
    for variant in ("dense", "relu", "sparse"):
        mem[variant] = {}
        for depth in (args.depth, args.depth + 2):
            s = [64] + [args.width] * depth + [10]
            p = init_params(jax.random.key(0), s)
            st = opt.init(p)
            xb = jax.ShapeDtypeStruct((args.mem_batch, 64), jnp.float32)
            yb = jax.ShapeDtypeStruct((args.mem_batch,), jnp.int32)
            mem[variant][depth] = temp_bytes(step_fn(make_loss(variant, capacity), opt),
                                             p, st, xb, yb)
        mem[variant]["per_hidden_layer"] = (mem[variant][args.depth + 2]
                                            - mem[variant][args.depth]) / 2
    results["step_temp_bytes"] = mem

    # ---------------- the ReLU residual alone
    chain = {}
    for name, act in (("jax.nn.relu", jax.nn.relu), ("ltjax.relu", A.relu)):
        t2 = relu_chain_temp(act, 2, args.mem_batch, 1024)
        t6 = relu_chain_temp(act, 6, args.mem_batch, 1024)
        chain[name] = {"depth2": t2, "depth6": t6, "per_relu": (t6 - t2) / 4}
    chain["elements_per_relu"] = args.mem_batch * 1024
    chain["ratio"] = chain["jax.nn.relu"]["per_relu"] / chain["ltjax.relu"]["per_relu"]
    results["relu_chain_temp_bytes"] = chain

    # ---------------- training
    curves, times, fallbacks = {}, {}, {}
    final_params = {}
    for variant in ("dense", "relu", "sparse"):
        loss = make_loss(variant, capacity)
        if variant == "sparse":
            vg = A.value_and_grad_exact(loss)
        else:
            vg = jax.jit(jax.value_and_grad(loss))
        update = jax.jit(lambda g, s, p: opt.update(g, s, p))
        apply = jax.jit(optax.apply_updates)
        params, state = params0, opt.init(params0)
        losses, ts = [], []
        for idx in batches:
            t0 = time.perf_counter()
            l, g = vg(params, data_x[idx], data_y[idx])
            u, state = update(g, state, params)
            params = apply(params, u)
            jax.block_until_ready(params)
            ts.append(time.perf_counter() - t0)
            losses.append(float(l))
        curves[variant] = losses
        times[variant] = statistics.median(ts[5:])
        fallbacks[variant] = getattr(vg, "fallbacks", 0)
        final_params[variant] = params
    results["loss_curves"] = curves
    results["final_loss"] = {k: v[-1] for k, v in curves.items()}
    results["curves_bit_equal_to_dense"] = {k: curves[k] == curves["dense"] for k in curves}
    results["step_time_median_s"] = times
    results["step_time_ratio_vs_dense"] = {k: times[k] / times["dense"] for k in times}
    results["overflow_fallbacks"] = fallbacks
    results["sparsity_final"] = sparsity(final_params["dense"], data_x)

    print(f"layers {sizes}, train batch {args.batch}, memory batch {args.mem_batch}, "
          f"capacity {capacity:.3f}")
    print(f"post-ReLU sparsity init {np.round(sp0, 3).tolist()} final "
          f"{np.round(results['sparsity_final'], 3).tolist()}")
    print(f"{'variant':8} {f'temp d={args.depth} MiB':>14} {f'temp d={args.depth + 2}':>10}"
          f" {'per layer':>10} {'vs dense':>9} {'step ms':>8} {'vs dense':>9} {'final loss':>11}"
          f" {'==dense':>7}")
    for v in ("dense", "relu", "sparse"):
        m = mem[v]
        print(f"{v:8} {m[args.depth] / 2**20:14.1f} {m[args.depth + 2] / 2**20:10.1f} "
              f"{m['per_hidden_layer'] / 2**20:10.2f} "
              f"{mem['dense']['per_hidden_layer'] / max(1, m['per_hidden_layer']):8.2f}x "
              f"{times[v] * 1e3:8.1f} {times[v] / times['dense']:8.3f}x "
              f"{curves[v][-1]:11.6f} {str(results['curves_bit_equal_to_dense'][v]):>7}")
    print(f"ReLU residual per layer ({chain['elements_per_relu']} elements): jax.nn.relu "
          f"{chain['jax.nn.relu']['per_relu'] / 2**20:.2f} MiB, ltjax.relu "
          f"{chain['ltjax.relu']['per_relu'] / 2**20:.3f} MiB, ratio {chain['ratio']:.1f}x")
    print(f"overflow fallbacks: {fallbacks}")

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
