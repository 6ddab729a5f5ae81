"""Runs the ltjax benchmarks, writes one JSON per run, draws the plots, logs a KPI record.

    ltjax bench [--quick] [--only NAME ...] [--out DIR]
    python -m benchmarks.run [--quick] [--only NAME ...] [--out DIR] [--list]

Discovery: every module ``benchmarks/<name>.py`` (not starting with ``_``, and not one of
the harness's own modules) that defines ``main(argv)`` is a benchmark. The convention a
module follows to plug in: ``main(argv) -> int`` (0 on success; a returned dict counts as
success), a parser accepting ``--quick`` (a CI-sized run) and ``--out PATH`` (its JSON). A
benchmark that cannot measure here (e.g. the CPU extension is not built) writes a JSON with a
``"skipped": "<why>"`` key and returns 0: the run lists it as skipped, with that reason.

Each run writes into DIR (default ``benchmarks/results/<date>-<backend>[-quick]/``):
``<name>.json`` per benchmark, ``run.json`` (machine, platform, CPU model, backend, device,
versions, git commit, load average at start and end, every benchmark's status, time and
JSON), the PNG plots and ``monitor.jsonl`` (one `ltjax.monitor` record for the run).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import sys
import time
import traceback
from typing import Any

import jax

from benchmarks import _common as C

HARNESS_MODULES = frozenset({"run", "plots", "make_readme"})
SCHEMA_VERSION = 1
RUN_SCHEMA: dict[str, Any] = {  # key: type (or tuple of types) every run.json has
    "schema_version": int,
    "run_id": str,
    "date": str,
    "quick": bool,
    "argv": list,
    "machine": dict,
    "backend": str,
    "device_name": str,
    "versions": dict,
    "git": dict,
    "loadavg_start": (list, type(None)),
    "loadavg_end": (list, type(None)),
    "timing_note": str,
    "benchmarks": dict,
    "plots": dict,
    "monitor": dict,
    "seconds": float,
}
MACHINE_KEYS = {"platform": str, "arch": str, "cpu_model": str, "cpu_count": (int, type(None))}
VERSION_KEYS = ("jax", "jaxlib", "flax", "numpy", "ltjax")
BENCH_KEYS = {"status": str, "seconds": float, "json": (str, type(None)), "result": (dict, type(None))}
STATUSES = ("ok", "failed", "skipped")


def discover() -> dict[str, str]:
    """``{name: "benchmarks.<name>"}`` of every module in this package that could be a benchmark."""
    import benchmarks

    names = {}
    for m in pkgutil.iter_modules(benchmarks.__path__):
        if m.ispkg or m.name.startswith("_") or m.name in HARNESS_MODULES:
            continue
        names[m.name] = f"benchmarks.{m.name}"
    return dict(sorted(names.items()))


def _conforms(mod) -> str:
    """Empty if ``mod`` follows the convention, else why not."""
    fn = getattr(mod, "main", None)
    if not callable(fn):
        return "no main()"
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return ""
    if not params:
        return "main() takes no argv, so --quick/--out cannot be passed"
    return ""


def order(selected: dict[str, str]) -> dict[str, str]:
    """Benchmarks that declare ``DEPENDS_ON`` (names whose JSON they read from the same run
    directory) run after those; otherwise alphabetical."""
    deps = {}
    for name, mod in selected.items():
        try:
            deps[name] = set(getattr(importlib.import_module(mod), "DEPENDS_ON", ())) & set(selected)
        except Exception:  # reported by run_one
            deps[name] = set()
    out: list[str] = []
    while len(out) < len(selected):
        ready = [n for n in selected if n not in out and deps[n] <= set(out)]
        out.append(ready[0] if ready else next(n for n in selected if n not in out))  # cycles: break them
    return {n: selected[n] for n in out}


def run_one(name: str, modname: str, out_dir: str, quick: bool) -> dict[str, Any]:
    path = os.path.join(out_dir, f"{name}.json")
    entry: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "json": None, "result": None}
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(modname)
    except Exception as e:  # a benchmark that cannot import must not stop the others
        entry.update(status="failed", error=f"import: {type(e).__name__}: {e}",
                     traceback=traceback.format_exc(), seconds=time.perf_counter() - t0)
        return entry
    why = _conforms(mod)
    if why:
        entry["reason"] = why
        return entry
    need = getattr(mod, "REQUIRES_BACKEND", None)  # e.g. "gpu": times native kernels only
    if need is not None and not quick and jax.default_backend() != need:
        entry["reason"] = f"needs the {need!r} backend; this one is {jax.default_backend()!r}"
        print(f"\n=== {name}: skipped ({entry['reason']})", flush=True)
        return entry
    argv = ["--out", path] + (["--quick"] if quick else [])
    entry["argv"] = argv
    print(f"\n=== {name} {' '.join(argv)}", flush=True)
    try:
        rc = mod.main(argv)
        ok = rc is None or rc == 0 or isinstance(rc, dict)
        entry["status"] = "ok" if ok else "failed"
        if not ok:
            entry["error"] = f"main returned {rc!r}"
    except SystemExit as e:  # argparse errors, explicit exits
        entry["status"] = "ok" if e.code in (None, 0) else "failed"
        if entry["status"] == "failed":
            entry["error"] = f"SystemExit({e.code!r})"
    except Exception as e:
        entry.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    entry["seconds"] = time.perf_counter() - t0
    if os.path.exists(path):
        entry["json"] = os.path.relpath(path, out_dir)
        with open(path) as f:
            entry["result"] = json.load(f)
        skipped = entry["result"].get("skipped") if isinstance(entry["result"], dict) else None
        if entry["status"] == "ok" and isinstance(skipped, str):  # ran, and said why it measured nothing
            entry.update(status="skipped", reason=skipped)
    elif entry["status"] == "ok":
        entry.update(status="failed", error=f"finished but wrote no JSON at {path}")
    print(f"=== {name}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
    return entry


def _monitor_record(run_id: str, out_dir: str, benches: dict[str, Any]) -> dict[str, Any]:
    """One `ltjax.monitor` record for the run: each benchmark's wall time, and the KPIs the
    benchmarks export under ``"kpi"`` (compression ratios, throughputs, latencies)."""
    from ltjax._analyze import CompressionReport, LeafReport
    from ltjax.monitor import Monitor

    mon = Monitor(os.path.join(out_dir, "monitor.jsonl"), run=run_id)
    try:
        for name, e in benches.items():
            mon.record_latency(f"benchmark/{name}", e["seconds"])
            kpi = (e.get("result") or {}).get("kpi") or {}
            for k, v in kpi.get("compression", {}).items():
                rep = CompressionReport((LeafReport(k, (), "", "ltjax", int(v["dense_nbytes"]), int(v["nbytes"])),))
                mon.record_compression(rep, k)
            for k, (nbytes, seconds) in kpi.get("throughput", {}).items():
                mon.record_throughput(k, nbytes, seconds)
            for k, ms in kpi.get("latency_ms", {}).items():
                mon.record_latency(k, ms / 1e3)
        return mon.flush()
    finally:
        mon.close()


def validate_run(obj: dict[str, Any]) -> list[str]:
    """Problems with a run.json object against the schema (empty list: valid)."""
    errs = []
    for k, t in RUN_SCHEMA.items():
        if k not in obj:
            errs.append(f"missing key {k!r}")
        elif not isinstance(obj[k], t) or (t is int and isinstance(obj[k], bool)):
            errs.append(f"{k!r} is {type(obj[k]).__name__}, expected {t}")
    if errs:
        return errs
    for k, t in MACHINE_KEYS.items():
        if not isinstance(obj["machine"].get(k), t):
            errs.append(f"machine[{k!r}] missing or not {t}")
    for k in VERSION_KEYS:
        if k not in obj["versions"]:
            errs.append(f"versions[{k!r}] missing")
    if not isinstance(obj["git"].get("commit"), str) or not obj["git"]["commit"]:
        errs.append("git.commit missing (use 'unknown' outside a checkout)")
    for name, e in obj["benchmarks"].items():
        for k, t in BENCH_KEYS.items():
            if not isinstance(e.get(k), t):
                errs.append(f"benchmarks[{name!r}][{k!r}] missing or not {t}")
        if e.get("status") not in STATUSES:
            errs.append(f"benchmarks[{name!r}].status={e.get('status')!r} not in {STATUSES}")
        if e.get("status") == "ok" and not isinstance(e.get("result"), dict):
            errs.append(f"benchmarks[{name!r}] is ok but has no result")
    for name, p in obj["plots"].items():
        if not isinstance(p, dict) or not isinstance(p.get("file"), str) or not isinstance(p.get("bytes"), int):
            errs.append(f"plots[{name!r}] needs file (str) and bytes (int)")
    return errs


def default_out_dir(quick: bool) -> str:
    return C.run_dir(quick)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ltjax bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run of each benchmark")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    p.add_argument("--skip", nargs="+", metavar="NAME", default=(), help="leave these out")
    p.add_argument("--out", help="output directory (default benchmarks/results/<date>-<backend>[-quick]/)")
    p.add_argument("--list", action="store_true", help="list the benchmarks found and exit")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)

    found = discover()
    if args.list:
        for name, mod in found.items():
            print(f"{name:20} {mod}")
        return 0
    unknown = [n for n in [*(args.only or ()), *args.skip] if n not in found]
    if unknown:
        print(f"ltjax bench: unknown benchmarks {unknown}; found {list(found)}", file=sys.stderr)
        return 2
    selected = {n: m for n, m in found.items() if (not args.only or n in args.only) and n not in args.skip}

    selected = order(selected)
    out_dir = args.out or default_out_dir(args.quick)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    env = C.environment()
    run_id = f"{env['date']}-{env['backend']}-{env['git']['commit'][:10]}"
    load0 = C.loadavg()
    print(f"ltjax bench: {len(selected)} benchmark(s) -> {out_dir}  backend={env['backend']} "
          f"device={env['device_name']} commit={env['git']['commit'][:10]} loadavg={load0}")

    benches = {name: run_one(name, mod, out_dir, args.quick) for name, mod in selected.items()}

    plots = {}
    if not args.no_plots:
        from benchmarks import plots as P

        for key, path in P.draw_all(benches, out_dir).items():
            plots[key] = {"file": os.path.relpath(path, out_dir), "bytes": os.path.getsize(path)}
    monitor = _monitor_record(run_id, out_dir, benches)

    run = {"schema_version": SCHEMA_VERSION, "run_id": run_id, "date": env["date"], "quick": args.quick,
           "argv": list(argv if argv is not None else sys.argv[1:]),
           **{k: env[k] for k in ("machine", "backend", "device_name", "device_count", "versions", "git")},
           "loadavg_start": load0, "loadavg_end": C.loadavg(), "timing_note": C.NOISE_NOTE,
           "benchmarks": benches, "plots": plots, "monitor": monitor,
           "seconds": time.perf_counter() - t0}
    errs = validate_run(json.loads(json.dumps(run, default=C._json_default)))
    if errs:  # the harness's own output must be valid: a bug here, not a benchmark failure
        raise AssertionError(f"run.json does not match its schema: {errs}")
    path = C.write_json(os.path.join(out_dir, "run.json"), run)

    print("\n" + C.table(["benchmark", "status", "seconds", "note"],
                         [[n, e["status"], f"{e['seconds']:.1f}", e.get("reason") or e.get("error") or ""]
                          for n, e in benches.items()]))
    for key, pl in plots.items():
        print(f"plot {key}: {os.path.join(out_dir, pl['file'])} ({pl['bytes']} bytes)")
    print(f"wrote {path} (loadavg {load0} -> {run['loadavg_end']})")
    return 0 if all(e["status"] != "failed" for e in benches.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
