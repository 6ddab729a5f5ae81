"""Perplexity of `models.llama` on real text: dense, int8 / int4 / the GGUF's own weights, int8 KV cache.

    python -m models.perplexity --windows 2 --window-len 512 [--json]
    python -m models.perplexity --codec int4 [--group 32|64|128] [--symmetric] [--int4-embedding]
    python -m models.perplexity --bits 4.5
    python -m models.perplexity --codec int4 --group 64 --calibrate 4096
    python -m models.perplexity --variants dense,int8,int4,gguf

The text defaults to the Python docs shipped with the standard library
(``"\\n".join(pydoc_data.topics.topics.values())``). It is tokenised once and cut
into consecutive, non-overlapping windows of ``window_len`` tokens; each window
is scored on its own (no context carried across) and predicts its tokens 1..L-1.
Perplexity is ``exp`` of the mean negative log-likelihood over all scored tokens.

Rows:
  dense      the plain model (no cache), the reference.
  kv8        dense weights, keys/values written to an int8 cache and attended
             from it (the prefill reads the cache, as decode would).
  int8       ltjax int8 weights (``compress_params``), plain attention.
  int8+kv8   both.
  int4, int4+kv8   ltjax int4 weights (``--group``, ``--symmetric``; embedding int8 unless
             ``--int4-embedding``), without / with the int8 cache.
  plan, plan+kv8   each weight's codec chosen by the planner (`ltjax.plan`) so the weights
             average at most ``--bits`` bits per weight (``--bits B`` alone: dense and plan).
  gguf, gguf+kv8   the GGUF file's own quantization (its Q4_0 / Q4_1 tensors as ltjax int4,
             no second rounding; ``--gguf-q8`` for a Q8_0 embedding): on SmolLM2 these
             decode to exactly the dense row's weights.
``--calibrate T`` rounds the int4 and plan rows' projections by GPTQ, with input statistics from
the T tokens that follow the scored windows (disjoint from them; `models.generate.calibration_stats`).
The compressed rows go through ``ltjax.compress_tree`` (`models.generate.compress_params`) and
run the unmodified model under ``ltjax.nn.intercept()`` (`make_apply_fn`). The default rows are
dense, kv8, int8, int8+kv8; ``--codec C`` means dense and C. A row whose weights are not
available (an ltjax without ``compress_tree``; gguf on a random model) reports
``{"unavailable": reason}``. ``--json`` prints one object (see `report`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.generate import add_int4_args, calibration_stats, compress_params, int4_kwargs, make_apply_fn
from models.llama import LlamaConfig, init_cache

VARIANTS = {"dense": ("none", None), "kv8": ("none", "int8"), "int8": ("int8", None), "int8+kv8": ("int8", "int8"),
            "int4": ("int4", None), "int4+kv8": ("int4", "int8"), "plan": ("plan", None), "plan+kv8": ("plan", "int8"),
            "gguf": ("gguf", None), "gguf+kv8": ("gguf", "int8")}
DEFAULT_VARIANTS = ("dense", "kv8", "int8", "int8+kv8")


def default_text() -> str:
    """The stdlib's pydoc topics: about 465 k characters of English prose."""
    import pydoc_data.topics  # pylint: disable=import-outside-toplevel

    return "\n".join(pydoc_data.topics.topics.values())


def make_windows(ids, n_windows: int, window_len: int) -> np.ndarray:
    """The first ``n_windows`` consecutive ``window_len`` windows of ``ids`` as ``[n, L]``."""
    ids = np.asarray(ids, np.int32)
    if window_len < 2:
        raise ValueError(f"{window_len=} must be >= 2")
    if n_windows < 1 or n_windows * window_len > ids.size:
        raise ValueError(
            f"{n_windows=} windows of {window_len=} need {n_windows * window_len} tokens; the text has {ids.size}"
        )
    return ids[: n_windows * window_len].reshape(n_windows, window_len)


def window_nll_fn(apply_fn, config: LlamaConfig, kv_cache: str | None):
    """Jitted ``(params, window [1, L]) -> nll [L-1]`` for one model variant."""

    def nll(params, window):
        if kv_cache is None:
            logits, _ = apply_fn(params, window, None, 0)
        else:
            cache = init_cache(config, window.shape[0], window.shape[1], kind=kv_cache)
            logits, _ = apply_fn(params, window, cache, 0)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.take_along_axis(logp, window[:, 1:, None], axis=-1)[0, :, 0]

    return jax.jit(nll)


def perplexity(params, config: LlamaConfig, windows: np.ndarray, *, apply_fn=None, kv_cache: str | None = None) -> dict:
    """``{"perplexity", "nll", "tokens", "seconds"}`` over ``windows [n, L]``, one window at a time."""
    apply_fn = make_apply_fn(config, None) if apply_fn is None else apply_fn
    fn = window_nll_fn(apply_fn, config, kv_cache)
    t0 = time.perf_counter()
    total, count = 0.0, 0
    for w in windows:
        nll = np.asarray(fn(params, jnp.asarray(w[None])), np.float64)
        total += float(nll.sum())
        count += nll.size
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "seconds": time.perf_counter() - t0}


def run_variants(params, config, windows, variants=DEFAULT_VARIANTS, *, gguf_params=None, calibration=None,
                 **int4) -> dict:
    """Runs each named variant of `VARIANTS`; a missing weight codec gives ``{"unavailable": ...}``.

    ``gguf_params``: the GGUF file's own quantization (`models.generate.load_model` with
    ``keep_quantized=True``), for the gguf rows. ``int4``: `compress_params`' int4 keywords
    (`models.generate.int4_kwargs`; its ``bits`` is the plan rows' budget). ``calibration``:
    `models.generate.calibration_stats` for the int4 and plan rows (GPTQ).
    Each available row also carries ``vs_dense`` (its perplexity over the dense row's) when
    the dense row ran.
    """
    results = {}
    compressed = {}
    for name in variants:
        codec, kv = VARIANTS[name]
        if codec == "gguf" and gguf_params is None:
            results[name] = {"unavailable": "no GGUF file's own quantization here (a random model, or not asked)"}
            continue
        try:
            if codec not in compressed:
                source = gguf_params if codec == "gguf" else params
                kw = {k: v for k, v in int4.items() if k != "bits" or codec == "plan"}
                if calibration is not None and codec in ("int4", "plan"):
                    kw["calibration"] = calibration
                compressed[codec] = (compress_params(source, codec, **kw), make_apply_fn(config, codec))
        except ImportError as e:
            results[name] = {"unavailable": f"codec {codec!r}: {e}"}
            continue
        cparams, apply_fn = compressed[codec]
        results[name] = perplexity(cparams, config, windows, apply_fn=apply_fn, kv_cache=kv)
    dense = results.get("dense", {}).get("perplexity")
    for r in results.values():
        if dense and "perplexity" in r:
            r["vs_dense"] = r["perplexity"] / dense
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-file", help="UTF-8 text (default: stdlib pydoc topics)")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--window-len", type=int, default=512)
    p.add_argument("--variants", help=f"comma-separated subset of {list(VARIANTS)} (default: "
                   f"{','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--codec", choices=sorted({c for c, _ in VARIANTS.values()} - {"none"}),
                   help="shorthand for --variants dense,CODEC")
    add_int4_args(p)
    p.add_argument("--checkpoint", help="GGUF file or HF safetensors dir (default: SmolLM2)")
    p.add_argument("--random-init", action="store_true", help="random weights of the same shape")
    p.add_argument("--tiny", action="store_true", help="a random tiny model with a byte tokenizer (tests)")
    p.add_argument("--json", action="store_true", help="print one JSON object (schema: see `report`)")
    args = p.parse_args(argv)
    if args.codec and args.variants:
        p.error("--codec C means --variants dense,C: give one of them")
    if args.bits is not None and not args.bits > 0:
        p.error(f"--bits {args.bits} must be a positive number of bits per weight")
    if args.bits is not None and not args.codec and not args.variants:
        args.codec = "plan"
    spec = f"dense,{args.codec}" if args.codec else args.variants or ",".join(DEFAULT_VARIANTS)
    variants = [v for v in spec.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants {spec!r}: unknown {unknown}; choose from {list(VARIANTS)}")
    if any(VARIANTS[v][0] == "plan" for v in variants) != (args.bits is not None):
        p.error(f"--bits is the budget of the plan rows and only theirs: give both or neither (rows {variants}, "
                f"--bits {args.bits})")
    if args.windows < 1 or args.window_len < 2:
        p.error(f"--windows {args.windows} must be >= 1 and --window-len {args.window_len} >= 2")
    if args.calibrate is not None and (args.calibrate < 1 or not any(VARIANTS[v][0] in ("int4", "plan")
                                                                      for v in variants)):
        p.error(f"--calibrate {args.calibrate}: a number of tokens >= 1, for int4 or plan rows (rows {variants})")
    if args.text_file and not os.path.isfile(args.text_file):
        p.error(f"--text-file {args.text_file!r} does not exist")

    from models.generate import load_model  # pylint: disable=import-outside-toplevel

    # The gguf rows read the file's own quantization; the dense weights are then its exact decoding.
    want_gguf = any(VARIANTS[v][0] == "gguf" for v in variants) and not (args.tiny or args.random_init)
    try:
        params, config, encode, _, _, source = load_model(args.checkpoint, args.random_init, tiny=args.tiny,
                                                          keep_quantized=want_gguf, q8_0=args.gguf_q8)
    except ValueError as e:
        p.error(str(e))
    gguf_params = None
    if want_gguf:
        gguf_params, params = jax.device_put(params), decompressed(params)
    params = jax.device_put(params)
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    else:
        text = default_text()
    ids = encode(text)
    try:
        windows = make_windows(ids, args.windows, args.window_len)
    except ValueError as e:
        p.error(str(e))
    calibration = None
    if args.calibrate is not None:  # the tokens after the scored windows: disjoint from them
        try:
            calibration = calibration_stats(params, config, ids[args.windows * args.window_len:], args.calibrate,
                                            window=args.window_len)
        except ValueError as e:
            p.error(f"--calibrate {args.calibrate}: {e}")
    load_before = os.getloadavg()
    try:
        results = run_variants(params, config, windows, variants, gguf_params=gguf_params, calibration=calibration,
                               **int4_kwargs(args))
    except ValueError as e:  # e.g. a --bits budget no assignment meets
        p.error(str(e))
    out = report(
        results,
        model=source,
        text=args.text_file or "pydoc_data.topics",
        windows=args.windows,
        window_len=args.window_len,
        loadavg=[load_before, os.getloadavg()],
        calibration_tokens=args.calibrate,
    )
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"model: {source}; text: {out['text']}; {args.windows} x {args.window_len}-token windows"
          + (f"; int4 by GPTQ from the next {args.calibrate} tokens" if args.calibrate else ""))
    print(f"{'variant':<10} {'perplexity':>11} {'vs dense':>9} {'tokens':>7} {'seconds':>8}")
    for name, r in results.items():
        if "unavailable" in r:
            print(f"{name:<10} {'unavailable':>11}  ({r['unavailable']})")
            continue
        ratio = f"{r['vs_dense']:.4f}" if "vs_dense" in r else "-"
        print(f"{name:<10} {r['perplexity']:>11.3f} {ratio:>9} {r['tokens']:>7} {r['seconds']:>8.1f}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {out['loadavg'][1]}")
    return 0


def decompressed(tree):
    """``tree`` with every `ltjax.CompressedTensor` leaf decoded (``ltjax.decompress``), as numpy."""
    import ltjax  # pylint: disable=import-outside-toplevel

    is_ct = lambda x: isinstance(x, ltjax.CompressedTensor)  # noqa: E731
    decode = jax.jit(ltjax.decompress)  # one compile per tensor layout, not op by op
    return jax.tree.map(lambda x: np.asarray(decode(x)) if is_ct(x) else x, tree, is_leaf=is_ct)


def report(results: dict, *, model: str, text: str, windows: int, window_len: int, loadavg,
           calibration_tokens: int | None = None) -> dict:
    """The ``--json`` object.

    ``{"model": str, "text": str, "windows": int, "window_len": int, "calibration_tokens": int | None,
    "loadavg": [[1, 5, 15 min before], [... after]],
    "variants": {name: {"perplexity", "nll", "tokens", "seconds", "vs_dense"} | {"unavailable": str}}}``
    """
    return {
        "model": model,
        "text": text,
        "windows": windows,
        "window_len": window_len,
        "calibration_tokens": calibration_tokens,
        "loadavg": [list(x) for x in loadavg],
        "variants": results,
    }


if __name__ == "__main__":
    sys.exit(main())
