"""PNG plots of a benchmark run: throughput vs M, ratio vs sparsity, memory dense vs compressed.

Each plot takes its data from whichever benchmarks of the run produced it (``rows`` with
the keys named below); a plot whose data is missing is still drawn, saying which benchmark
to run, so a run always has the same three files.

    python -m benchmarks.plots RUN_DIR      # redraw from RUN_DIR/run.json
"""

from __future__ import annotations

import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

GiB = 1024**3


def _rows(benches: dict[str, Any], *keys: str) -> list[tuple[str, dict]]:
    out = []
    for name, e in benches.items():
        for r in ((e or {}).get("result") or {}).get("rows", []) or []:
            if isinstance(r, dict) and all(k in r for k in keys):
                out.append((name, r))
    return out


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _device(benches) -> str:
    for e in benches.values():
        r = (e or {}).get("result") or {}
        if "device_name" in r:
            return f"{r.get('backend', '?')} / {r['device_name']}"
        if "device" in r:
            return str(r["device"])
    return "?"


def throughput_vs_m(benches, path: str) -> str:
    rows = _rows(benches, "M", "K", "codec", "t_ltjax_ms", "t_f32_ms")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if not rows:
        _placeholder(a1, "no GEMM data: run gemm_overhead (or matmul)")
        _placeholder(a2, "")
    else:
        seen_dense = set()
        for (src, k, codec, sp) in sorted({(n, r["K"], r["codec"], r.get("sparsity", 0.0)) for n, r in rows}):
            grp = sorted((r for n, r in rows if (n, r["K"], r["codec"], r.get("sparsity", 0.0)) == (src, k, codec, sp)),
                         key=lambda r: r["M"])
            ms = np.array([r["M"] for r in grp])
            fl = 2.0 * ms * k * k
            label = f"{src}: ltjax {codec} {sp:.0%} K=N={k}"
            a1.plot(ms, fl / (np.array([r["t_ltjax_ms"] for r in grp]) * 1e-3) / 1e9, "o-", label=label)
            if (src, k) not in seen_dense:
                seen_dense.add((src, k))
                a1.plot(ms, fl / (np.array([r["t_f32_ms"] for r in grp]) * 1e-3) / 1e9, "k--", alpha=0.6,
                        label=f"{src}: dense f32 K=N={k}")
                if "t_bf16_ms" in grp[0]:
                    a1.plot(ms, fl / (np.array([r["t_bf16_ms"] for r in grp]) * 1e-3) / 1e9, "k:", alpha=0.6,
                            label=f"{src}: dense bf16 K=N={k}")
            a2.plot(ms, [r["t_ltjax_ms"] / r["t_f32_ms"] for r in grp], "o-", label=label)
        a1.set(xscale="log", yscale="log", xlabel="M (rows of x)", ylabel="GFLOP/s",
               title="matmul throughput vs M")
        a2.axhline(1.0, color="k", lw=1)
        a2.axhline(1.1, color="r", lw=1, ls=":", label='"overhead < 10%" line')
        a2.set(xscale="log", yscale="log", xlabel="M (rows of x)", ylabel="t(ltjax) / t(dense f32)",
               title="GEMM overhead (>1: compression costs time)")
        a1.legend(fontsize=6)
        a2.legend(fontsize=6)
    fig.suptitle(f"device: {_device(benches)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ratio_vs_sparsity(benches, path: str) -> str:
    rows = _rows(benches, "sparsity", "codec", "ratio")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    s = np.linspace(0, 0.99, 200)
    # Bytes per element of each codec (f32 logical, per-channel scales and tile metadata ignored).
    ax.plot(s, 4 / (1 / 8 + 4 * (1 - s)), "C0-", alpha=0.4, label="bitmask (f32), theory")
    ax.plot(s, 4 / (1 / 8 + (1 - s)), "C1-", alpha=0.4, label="bitmask_int8 vs f32, theory")
    ax.plot(s, 2 / (1 / 8 + (1 - s)), "C2-", alpha=0.4, label="bitmask_int8 vs bf16, theory")
    ax.axhline(4.0, color="C3", lw=1, alpha=0.4, label="int8 vs f32 (any sparsity)")
    markers = {"raw": "x", "int8": "s", "bitmask": "o", "bitmask_int8": "^"}
    colors = {"raw": "C4", "int8": "C3", "bitmask": "C0", "bitmask_int8": "C1"}
    for codec in markers:
        pts = [(r["sparsity"], r["ratio"]) for _, r in rows if r["codec"] == codec]
        if pts:
            x, y = zip(*pts)
            ax.scatter(x, y, marker=markers[codec], color=colors[codec], label=f"measured {codec}", zorder=3)
    ax.axhline(12.31, color="k", ls=":", lw=1, label="claimed 12.31x (post-ReLU activation)")
    ax.set(xlabel="fraction of zeros", ylabel="compression ratio vs f32 (x)", yscale="log",
           title="ratio vs sparsity" + ("" if rows else " (theory only: run pack or claims)"))
    ax.legend(fontsize=7)
    fig.suptitle(f"device: {_device(benches)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory(benches, path: str) -> str:
    em = _rows(benches, "variant", "n_params", "program_bytes")
    claims = _rows(benches, "row", "f32_bytes", "bf16_bytes", "ltjax_bytes")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if not em:
        _placeholder(a1, "no compiled-memory data: run effective_memory")
    else:
        for fam in sorted({r["family"] for _, r in em}):
            for i, v in enumerate(sorted({r["variant"] for _, r in em})):
                grp = sorted((r for _, r in em if r["family"] == fam and r["variant"] == v),
                             key=lambda r: r["n_params"])
                x = np.array([r["n_params"] for r in grp], float)
                a1.plot(x, [r["program_bytes"] / GiB for r in grp], "o-", color=f"C{i}", label=f"{fam} {v} (compiled)")
                a1.plot(x, [r["arguments_only_bytes"] / GiB for r in grp], ":", color=f"C{i}", alpha=0.6)
        a1.set(xscale="log", yscale="log", xlabel="parameters", ylabel="GiB",
               title="decode-step memory (compiled program; dotted: arguments only)")
        a1.legend(fontsize=6)
    if not claims:
        _placeholder(a2, "no claims data: run claims")
    else:
        labels = [r["row"] for _, r in claims]
        x = np.arange(len(labels))
        bars = (("f32_bytes", "dense f32"), ("bf16_bytes", "dense bf16"), ("ltjax_bytes", "ltjax"))
        for j, (k, lab) in enumerate(bars):
            a2.bar(x + (j - 1) * 0.27, [r[k] / 2**20 for _, r in claims], 0.27, label=lab)
        a2.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
        a2.set(ylabel="MiB", yscale="log", title="claims table: bytes dense vs compressed")
        a2.legend(fontsize=7)
    fig.suptitle(f"device: {_device(benches)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = {"throughput_vs_M": throughput_vs_m, "ratio_vs_sparsity": ratio_vs_sparsity,
         "memory_dense_vs_compressed": memory}


def draw_all(benches: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Draws every plot into ``out_dir``; returns ``{name: path}``."""
    return {name: fn(benches, os.path.join(out_dir, f"{name}.png")) for name, fn in PLOTS.items()}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a benchmark run's directory (holds run.json); the plots are redrawn there")
    args = p.parse_args(argv)
    with open(os.path.join(args.run_dir, "run.json")) as f:
        run = json.load(f)
    for name, path in draw_all(run["benchmarks"], args.run_dir).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
