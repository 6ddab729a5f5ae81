"""Shared pieces of the benchmark scripts: the environment record, timing, JSON output.

Every benchmark module in this package follows one convention so `benchmarks.run` can
find it: it exposes ``main(argv) -> int`` (a dict is accepted too) whose parser takes
``--quick`` (a CI-sized run) and ``--out PATH`` (where its JSON goes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

NOISE_NOTE = ("timings taken on a machine shared with other jobs (see loadavg_start/end); "
              "treat them as indicative, not as peak figures")


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_dir(quick: bool = False, tag: str | None = None) -> str:
    """``benchmarks/results/<date>-<tag>[-quick]/`` (tag: the jax backend by default; date: UTC
    today): the dated folder a run writes into, so every result file names the run it came from."""
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    return os.path.join(RESULTS, f"{date}-{tag or jax.default_backend()}{'-quick' if quick else ''}")


def parser(description: str, name: str) -> argparse.ArgumentParser:
    """An argument parser with the two options every benchmark takes; `out_path` resolves ``--out``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="CI-sized run: small shapes, few repetitions")
    p.add_argument("--out", help=f"JSON output path (default benchmarks/results/<date>-<backend>[-quick]/{name}.json)")
    return p


def out_path(args: argparse.Namespace, name: str) -> str:
    """``--out``, or ``<name>.json`` in this run's dated folder (`run_dir`)."""
    return args.out or os.path.join(run_dir(getattr(args, "quick", False)), f"{name}.json")


def median_time(fn: Callable[[], Any], *, reps: int, warmup: int = 2, warmup_s: float | None = None) -> float:
    """Median wall seconds of ``fn()`` after ``warmup`` calls and at least ``warmup_s`` seconds of
    them (default 0.1 s on a GPU, none elsewhere); waits for every result.

    The time floor is for GPUs: a chain of eight 8192² layers takes ~0.4 ms, so two calls leave
    a card that idled through a compile still at low clocks. On the H200 the first timed point
    of a process read slow: the first M of the int8 series 56-59 us per layer vs 44 us for the
    same M timed later, a copy 224 us first vs 172 us after the matmul rows.
    """
    if warmup_s is None:
        warmup_s = 0.1 if jax.default_backend() == "gpu" else 0.0
    t_end = time.perf_counter() + warmup_s
    done = 0
    while done < warmup or time.perf_counter() < t_end:
        jax.block_until_ready(fn())
        done += 1
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) if ts else float("nan")


def paired_median_times(fns: list[Callable[[], Any]], *, reps: int, burst: int = 1, warmup: int = 2,
                        warmup_s: float | None = None) -> list[float]:
    """Median wall seconds per call of each of ``fns``, timed in alternation: round ``r`` takes one
    sample of ``fns[0]``, then of ``fns[1]``, ..., so drift in the machine (clocks, other jobs)
    falls on all of them alike. A sample is ``burst`` back-to-back calls, waiting only for the
    last, divided by ``burst``: with ``burst > 1`` the host's dispatch of a call overlaps the
    device's work on the one before, as in a running decode loop, instead of adding to every
    sample. Warm-up as `median_time`, for each function.
    """
    for fn in fns:
        median_time(fn, reps=0, warmup=warmup, warmup_s=warmup_s)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, samples):
            t0 = time.perf_counter()
            out = None
            for _ in range(burst):
                out = fn()
            jax.block_until_ready(out)
            ts.append((time.perf_counter() - t0) / burst)
    return [statistics.median(ts) for ts in samples]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_file() -> str | None:
    """The commit named by a ``COMMIT`` file at the repository root, if any: a copy of the tree
    sent to another machine (the GPU check) carries its commit there, where a copied ``.git``
    may be stale (seen: it named the session's first commit for every later run)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "COMMIT")
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def git_info() -> dict[str, Any]:
    """Commit, branch and whether tracked files differ from it ('unknown' outside a checkout);
    ``commit_file`` too when a ``COMMIT`` file names one (see `commit_file`)."""
    info: dict[str, Any] = {"commit": _git("rev-parse", "HEAD") or "unknown", "branch": None, "dirty": None}
    if info["commit"] != "unknown":
        info["branch"] = _git("rev-parse", "--abbrev-ref", "HEAD")
        info["dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    if (named := commit_file()) is not None:
        info["commit_file"] = named
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # not installed
        return None


def environment() -> dict[str, Any]:
    """Machine, backend, device and versions: what a figure depends on."""
    import numpy as np

    import ltjax

    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "arch": platform.machine(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "mem_total_bytes": mem_total_bytes(),
            "python": sys.version.split()[0],
        },
        "backend": jax.default_backend(),
        "device_name": str(dev.device_kind),
        "device_count": jax.device_count(),
        "versions": {
            "jax": jax.__version__,
            "jaxlib": _version("jaxlib"),
            "flax": _version("flax"),
            "numpy": np.__version__,
            "ltjax": ltjax.__version__,
        },
        "git": git_info(),
    }


def write_json(path: str, obj: dict[str, Any]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    os.replace(tmp, path)
    return path


def _json_default(x):
    import numpy as np

    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def result(benchmark: str, quick: bool, **fields) -> dict[str, Any]:
    """The common head of a benchmark's JSON (environment, load, noise note) plus ``fields``."""
    return {"benchmark": benchmark, "quick": quick, **environment(), "loadavg": loadavg(),
            "timing_note": NOISE_NOTE, **fields}


def decompress_impl(ct) -> str:
    """Which implementation ``ltjax.decompress(ct)`` runs on this host (the op's registry walk)."""
    from ltjax._config import host_platform
    from ltjax.ops import _dispatch
    from ltjax.ops.decompress.api import IMPLEMENTATIONS

    return _dispatch.choose(IMPLEMENTATIONS, (ct,), host_platform(), what="decompress").impl


def table(head: list[str], rows: list[list[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
