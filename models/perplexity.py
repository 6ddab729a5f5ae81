"""Perplexity of `models.llama` on real text: dense, int8 weights, int8 KV cache.

    python -m models.perplexity --windows 2 --window-len 512 [--json]

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
A row whose weight codec is not available yet (ltjax not built) reports
``{"unavailable": reason}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.generate import compress_params, make_apply_fn
from models.llama import LlamaConfig, init_cache

VARIANTS = {"dense": ("none", None), "kv8": ("none", "int8"), "int8": ("int8", None), "int8+kv8": ("int8", "int8")}


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


def run_variants(params, config, windows, variants=tuple(VARIANTS)) -> dict:
    """Runs each named variant of `VARIANTS`; a missing weight codec gives ``{"unavailable": ...}``."""
    results = {}
    compressed = {}
    for name in variants:
        codec, kv = VARIANTS[name]
        try:
            if codec not in compressed:
                compressed[codec] = (compress_params(params, codec), make_apply_fn(config, codec))
        except ImportError as e:
            results[name] = {"unavailable": f"codec {codec!r}: {e}"}
            continue
        cparams, apply_fn = compressed[codec]
        results[name] = perplexity(cparams, config, windows, apply_fn=apply_fn, kv_cache=kv)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-file", help="UTF-8 text (default: stdlib pydoc topics)")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--window-len", type=int, default=512)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--checkpoint", help="GGUF file or HF safetensors dir (default: SmolLM2)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    from models.generate import load_model  # pylint: disable=import-outside-toplevel

    params, config, encode, _, _ = load_model(args.checkpoint)
    params = jax.device_put(params)
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    else:
        text = default_text()
    windows = make_windows(encode(text), args.windows, args.window_len)
    results = run_variants(params, config, windows, variants)
    if args.json:
        print(json.dumps(results))
        return 0
    dense = results.get("dense", {}).get("perplexity")
    print(f"{'variant':<10} {'perplexity':>11} {'vs dense':>9} {'tokens':>7} {'seconds':>8}")
    for name, r in results.items():
        if "unavailable" in r:
            print(f"{name:<10} {'unavailable':>11}  ({r['unavailable']})")
            continue
        ratio = f"{r['perplexity'] / dense:.4f}" if dense else "-"
        print(f"{name:<10} {r['perplexity']:>11.3f} {ratio:>9} {r['tokens']:>7} {r['seconds']:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
