"""Effective memory: the largest Llama-architecture model whose decode step fits a device, dense vs ltjax.

For a family of configs (fixed width, varying depth) the jitted decode step (batch 1, one
new token, a KV cache of ``--context`` tokens, donated) is lowered and compiled with
abstract inputs only (`jax.ShapeDtypeStruct`: no weight is allocated, nothing runs). Its
bytes are read from the compiled program's own memory analysis:

    program bytes = argument + output − alias (the donated cache) + temp

for each variant: dense f32 (f32 cache), dense bf16 (bf16 cache), ltjax int8 weights (bf16
logical dtype, bf16 cache) and ltjax int8 weights + int8 KV cache. Bytes are linear in the
parameter count within a family; the fit gives the largest model (parameters, layers) that
fits a given device memory (default 24 GiB and 80 GiB) for each variant.

Two figures per variant, never mixed up (each variant compared with dense on the same one):
  * "arguments only", the headline ("bytes held"): the bytes of the step's inputs as the
    compiled program takes them (weights + KV cache), what a GPU holds: int8 weights are half
    of bf16 and a quarter of f32. "24 GiB holds X GiB of bf16" is 24 GiB times the largest
    int8 + int8-KV model over the largest dense bf16 model, both fitted on bytes held.
  * "compiled": what the program this ltjax build produces needs on this backend (temp
    included). Where the op layer decodes weights in XLA, XLA may hoist every decode to the
    program start and keep all dense copies live, which erases the saving; this figure shows
    it. On XLA:CPU it also carries a CPU artefact: a bf16 dot upcasts its weights to f32 in
    temp memory, so dense bf16 fits *less* than dense f32 there and an "effective vs bf16"
    taken on compiled bytes flatters ltjax; it is a second, labelled figure.

    python -m benchmarks.effective_memory [--quick] [--out PATH] [--device-gib 24 80]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common as C, _llama as L
from models.llama import Llama, LlamaConfig, init_cache, param_shapes

GiB = 1024**3

# Llama-2-7B widths (dim 4096, ffn 11008, 32 heads, MHA, vocab 32000): vary the depth.
FAMILIES = {
    "llama2-7b-width": dict(vocab=32000, dim=4096, n_heads=32, n_kv_heads=32, head_dim=128, ffn_dim=11008,
                            tie_embeddings=False, full_depths=(1, 2, 4), reference_layers=32),
    "smollm2-135m-width": dict(vocab=49152, dim=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                               tie_embeddings=True, full_depths=(2, 4, 8), reference_layers=30),
    "tiny": dict(vocab=256, dim=128, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256,
                 tie_embeddings=True, full_depths=(1, 2), reference_layers=4),
}
VARIANTS = {  # name: (weights, weight dtype, kv kind, kv dtype)
    "dense_f32": ("dense", jnp.float32, "dense", jnp.float32),
    "dense_bf16": ("dense", jnp.bfloat16, "dense", jnp.bfloat16),
    "ltjax_int8": ("int8", jnp.bfloat16, "dense", jnp.bfloat16),
    "ltjax_int8+kv8": ("int8", jnp.bfloat16, "int8", None),
}


def config_of(family: str, n_layers: int) -> LlamaConfig:
    f = {k: v for k, v in FAMILIES[family].items() if k not in ("full_depths", "reference_layers")}
    return LlamaConfig(n_layers=n_layers, **f)


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def measure(cfg: LlamaConfig, variant: str, context: int) -> dict:
    weights, wdtype, kv, kvdtype = VARIANTS[variant]
    shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, wdtype), param_shapes(cfg))
    params = shapes if weights == "dense" else L.abstract_compress_tree(shapes, weights)
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, context, kind=kv,
                                              **({} if kvdtype is None else {"dtype": kvdtype})))
    model = Llama(cfg)

    def step(params, token, cache, pos):
        if weights == "dense":
            logits, cache = model.apply({"params": params}, token[:, None], cache, pos)
        else:
            with L.intercept():
                logits, cache = model.apply({"params": params}, token[:, None], cache, pos)
        return jnp.argmax(logits[:, -1], -1), cache

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(2,)).lower(
        params, jax.ShapeDtypeStruct((1,), jnp.int32), cache, jax.ShapeDtypeStruct((), jnp.int32)).compile()
    ma = compiled.memory_analysis()
    arg, out, alias, temp = (int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                             int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes))
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(param_shapes(cfg)))
    return dict(n_layers=cfg.n_layers, n_params=n_params, variant=variant,
                weight_bytes=_nbytes(params), cache_bytes=_nbytes(cache),
                argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
                program_bytes=arg + out - alias + temp, arguments_only_bytes=arg,
                compile_s=time.perf_counter() - t0)


def fit(rows: list[dict], key: str) -> tuple[float, float, float]:
    """Least squares ``bytes = a + b * n_params``; returns (a, b, max relative residual)."""
    x = np.array([r["n_params"] for r in rows], float)
    y = np.array([r[key] for r in rows], float)
    b, a = np.polyfit(x, y, 1)
    resid = float(np.max(np.abs(a + b * x - y) / y))
    return float(a), float(b), resid


def largest_fit(a: float, b: float, per_layer_params: float, base_params: float, device_bytes: float) -> dict:
    n = (device_bytes - a) / b if b > 0 else float("inf")
    layers = (n - base_params) / per_layer_params
    return {"max_params": n, "max_layers": layers}


def main(argv=None) -> int:
    p = C.parser(__doc__.splitlines()[0], "effective_memory")
    p.add_argument("--families", nargs="+", choices=tuple(FAMILIES), help="config families to sweep")
    p.add_argument("--context", type=int, help="KV cache length (default 2048; quick 64)")
    p.add_argument("--device-gib", type=float, nargs="+", default=[24.0, 80.0])
    args = p.parse_args(argv)
    args.out = C.out_path(args, "effective_memory")
    families = args.families or (["tiny"] if args.quick else ["llama2-7b-width", "smollm2-135m-width"])
    context = args.context or (64 if args.quick else 2048)
    load0 = C.loadavg()
    print(f"weights through: {L.INTERCEPT}")
    rows, fits = [], []
    for fam in families:
        depths = FAMILIES[fam]["full_depths"]
        p_of = {d: sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(param_shapes(config_of(fam, d))))
                for d in depths}
        per_layer = (p_of[depths[-1]] - p_of[depths[0]]) / (depths[-1] - depths[0])
        base = p_of[depths[0]] - per_layer * depths[0]
        for variant in VARIANTS:
            vrows = []
            for d in depths:
                r = dict(family=fam, context=context, **measure(config_of(fam, d), variant, context))
                vrows.append(r)
                print(f"{fam:>18} {variant:>15} L={d:3d} params {r['n_params'] / 1e6:9.1f} M  weights "
                      f"{r['weight_bytes'] / GiB:7.3f} GiB  cache {r['cache_bytes'] / GiB:6.3f} GiB  temp "
                      f"{r['temp_bytes'] / GiB:7.3f} GiB  program {r['program_bytes'] / GiB:7.3f} GiB  "
                      f"(compile {r['compile_s']:.1f} s)")
            rows += vrows
            for key, label in (("program_bytes", "compiled"), ("arguments_only_bytes", "arguments only")):
                a, b, resid = fit(vrows, key)
                entry = dict(family=fam, variant=variant, measure=label, context=context,
                             bytes_fixed=a, bytes_per_param=b, fit_max_rel_residual=resid,
                             params_per_layer=per_layer, params_outside_layers=base,
                             reference_model_params=base + per_layer * FAMILIES[fam]["reference_layers"],
                             reference_model_layers=FAMILIES[fam]["reference_layers"], fits={})
                for gib in args.device_gib:
                    entry["fits"][f"{gib:g}GiB"] = largest_fit(a, b, per_layer, base, gib * GiB)
                fits.append(entry)
    # "24 GB -> X GB effective": the dense memory a model as large as the int8 + int8-KV fit would
    # need, each measure against dense on the same measure. Headline: bytes held.
    summary = []
    for fam in families:
        get = lambda v, m: next(f for f in fits if f["family"] == fam and f["variant"] == v and f["measure"] == m)
        for gib in args.device_gib:
            k = f"{gib:g}GiB"
            row = {"family": fam, "device": k, "device_gib": gib}
            for v in VARIANTS:
                for m in ("compiled", "arguments only"):
                    row[f"{v} [{m}]"] = get(v, m)["fits"][k]["max_params"]
            for base_v in ("dense_f32", "dense_bf16"):
                for m, label in (("arguments only", "bytes held"), ("compiled", "compiled")):
                    ours, base = get("ltjax_int8+kv8", m)["fits"][k], get(base_v, m)["fits"][k]
                    row[f"effective_GiB ltjax_int8+kv8 [{label}] vs {base_v}"] = (
                        gib * ours["max_params"] / base["max_params"])
            held = "effective_GiB ltjax_int8+kv8 [bytes held] vs dense_"
            row["headline"] = (f"{gib:g} GiB holds {row[held + 'bf16']:.0f} GiB of bf16 ({row[held + 'f32']:.0f} GiB "
                               "of f32): int8 weights + int8 KV cache, bytes held")
            summary.append(row)
    head = ["family", "device", "variant", "max params (compiled)", "max layers", "max params (args only)"]
    trows = []
    for fam in families:
        for gib in args.device_gib:
            k = f"{gib:g}GiB"
            for v in VARIANTS:
                fc, fa = (next(f for f in fits if f["family"] == fam and f["variant"] == v and f["measure"] == m)
                          for m in ("compiled", "arguments only"))
                trows.append([fam, k, v, f"{fc['fits'][k]['max_params'] / 1e9:.2f} B",
                              f"{fc['fits'][k]['max_layers']:.0f}", f"{fa['fits'][k]['max_params'] / 1e9:.2f} B"])
    print(C.table(head, trows))
    for s in summary:
        print(f"{s['family']} {s['device']}: {s['headline']}; compiled {jax.default_backend()} program "
              f"(temp included): {s['effective_GiB ltjax_int8+kv8 [compiled] vs dense_bf16']:.1f} GiB of bf16, "
              f"{s['effective_GiB ltjax_int8+kv8 [compiled] vs dense_f32']:.1f} GiB of f32")
    res = C.result("effective_memory", args.quick, loadavg_start=load0, loadavg_end=C.loadavg(),
                   weights_through=L.INTERCEPT, method=(
                       "jit(decode step).lower(ShapeDtypeStruct inputs).compile().memory_analysis(); "
                       "bytes held = argument bytes (weights + KV cache); compiled program bytes = argument + "
                       "output - alias + temp; linear fit in parameter count"),
                   headline_measure="bytes held (arguments only), each variant against dense on the same measure",
                   context=context, batch=1, rows=rows, fits=fits, summary=summary)
    print(f"wrote {C.write_json(args.out, res)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
