"""KPI monitoring: compression ratio, decode throughput, matmul latency, fallbacks, GPU health.

A `Monitor` collects numbers during a run and writes one JSON line per `flush()`:

>>> import ltjax, ltjax.monitor
>>> mon = ltjax.monitor.Monitor(path=None)           # path=None: keep records in memory
>>> mon.record_latency("matmul", 0.002); mon.record_latency("matmul", 0.004)
>>> rec = mon.flush()
>>> rec["latency"]["matmul"]["p50_ms"]
3.0

On NVIDIA GPUs with `nvidia-ml-py` installed, each flush samples temperature, power and
memory through NVML; where NVML is absent the GPU fields are simply ``None``. Thresholds
(`Thresholds`) that are crossed log a warning, are recorded in the line, and — with
``fallback_to_dense=True`` — set `Monitor.prefer_dense`, which `Monitor.select` honours.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger("ltjax")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Limits that trigger a warning (and, optionally, the fallback to dense)."""

    temperature_c: float | None = 85.0
    power_w: float | None = None
    memory_fraction: float | None = 0.97


class _FallbackHandler(logging.Handler):
    """Counts the op layer's fallback messages (logged once per reason on the "ltjax" logger)."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "fallback" in msg.lower() or "falls back" in msg.lower():
            self.events.append(msg)


def _load_nvml():
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / no GPU: a clean no-op
        return None
    return pynvml


class Monitor:
    """Collects ltjax KPIs and writes them as JSON lines.

    Args:
      path: JSON-lines file to append to (``None``: records are only returned/kept).
      run: a name for this run, written in every line.
      thresholds: limits for GPU temperature, power and memory.
      fallback_to_dense: when a threshold is crossed, set `prefer_dense`.
      nvml: an NVML module (``pynvml`` API) to use instead of importing one; for tests.
      device_index: which GPU to sample.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = "ltjax_monitor.jsonl",
        *,
        run: str = "run",
        thresholds: Thresholds = Thresholds(),
        fallback_to_dense: bool = False,
        nvml: Any = "auto",
        device_index: int = 0,
    ):
        self.path = None if path is None else os.fspath(path)
        self.run = run
        self.thresholds = thresholds
        self.fallback_to_dense = fallback_to_dense
        self.prefer_dense = False
        self.records: list[dict[str, Any]] = []
        self._nvml = _load_nvml() if nvml == "auto" else nvml
        self._device_index = device_index
        self._latency: dict[str, list[float]] = {}
        self._throughput: dict[str, list[tuple[float, float]]] = {}
        self._ratios: dict[str, float] = {}
        self._paths: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._fallbacks = _FallbackHandler()
        log.addHandler(self._fallbacks)

    # -------------------------------------------------------------- recording
    def record_latency(self, name: str, seconds: float) -> None:
        with self._lock:
            self._latency.setdefault(name, []).append(float(seconds))

    def record_throughput(self, name: str, nbytes: float, seconds: float) -> None:
        with self._lock:
            self._throughput.setdefault(name, []).append((float(nbytes), float(seconds)))

    def record_compression(self, tree_or_report: Any, name: str = "model") -> float:
        """Records the weight compression ratio of a (compressed) tree or a `CompressionReport`."""
        from ltjax._analyze import CompressionReport, tree_report

        rep = tree_or_report if isinstance(tree_or_report, CompressionReport) else tree_report(tree_or_report)
        with self._lock:
            self._ratios[name] = rep.ratio
        return rep.ratio

    def record_path(self, name: str, x: Any, ct: Any) -> Any:
        """Records which implementation ``ltjax.matmul(x, ct)`` runs, and why not the others
        (`ltjax.explain`); returned too. ``x`` may be a ``jax.ShapeDtypeStruct``."""
        from ltjax.ops.matmul import explain

        e = explain(x, ct)
        with self._lock:
            self._paths[name] = e.to_json()
        return e

    def timed(self, name: str, fn: Callable, *args, nbytes: float | None = None, **kwargs):
        """Runs ``fn(*args, **kwargs)``, waits for its result, records latency (and throughput)."""
        import jax

        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        dt = time.perf_counter() - t
        self.record_latency(name, dt)
        if nbytes is not None:
            self.record_throughput(name, nbytes, dt)
        return out

    # -------------------------------------------------------------- GPU
    def sample_gpu(self) -> dict[str, Any] | None:
        """Temperature (°C), power (W) and memory (bytes) of the GPU, or None without NVML."""
        nv = self._nvml
        if nv is None:
            return None
        try:
            h = nv.nvmlDeviceGetHandleByIndex(self._device_index)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            return {
                "temperature_c": float(nv.nvmlDeviceGetTemperature(h, getattr(nv, "NVML_TEMPERATURE_GPU", 0))),
                "power_w": float(nv.nvmlDeviceGetPowerUsage(h)) / 1000.0,
                "memory_used": int(mem.used),
                "memory_total": int(mem.total),
            }
        except Exception as e:  # a flaky driver must not kill a run
            log.warning("ltjax.monitor: NVML query failed: %s", e)
            return None

    def _check(self, gpu: dict[str, Any] | None) -> list[str]:
        if not gpu:
            return []
        th, warnings = self.thresholds, []
        if th.temperature_c is not None and gpu["temperature_c"] >= th.temperature_c:
            warnings.append(f"GPU temperature {gpu['temperature_c']:.0f} C >= {th.temperature_c:.0f} C")
        if th.power_w is not None and gpu["power_w"] >= th.power_w:
            warnings.append(f"GPU power {gpu['power_w']:.0f} W >= {th.power_w:.0f} W")
        used = gpu["memory_used"] / gpu["memory_total"] if gpu["memory_total"] else None
        if th.memory_fraction is not None and used is not None and used >= th.memory_fraction:
            warnings.append(f"GPU memory {used:.0%} used >= {th.memory_fraction:.0%}")
        return warnings

    # -------------------------------------------------------------- output
    def flush(self) -> dict[str, Any]:
        """Summarises what was recorded since the last flush into one JSON line (returned too)."""
        with self._lock:
            lat, thr, ratios, paths = self._latency, self._throughput, dict(self._ratios), self._paths
            self._latency, self._throughput, self._paths = {}, {}, {}
            fallbacks = list(self._fallbacks.events)
            self._fallbacks.events.clear()
        gpu = self.sample_gpu()
        warnings = self._check(gpu)
        for w in warnings:
            log.warning("ltjax.monitor: %s%s", w, "; falling back to dense weights" if self.fallback_to_dense else "")
        if warnings and self.fallback_to_dense:
            self.prefer_dense = True
        rec = {
            "time": time.time(),
            "run": self.run,
            "compression_ratio": ratios,
            "throughput_GBps": {k: sum(b for b, _ in v) / sum(s for _, s in v) / 1e9
                                for k, v in thr.items() if sum(s for _, s in v) > 0},
            "latency": {
                k: {
                    "n": len(v),
                    "p50_ms": float(np.percentile(v, 50) * 1e3),
                    "p90_ms": float(np.percentile(v, 90) * 1e3),
                    "p99_ms": float(np.percentile(v, 99) * 1e3),
                }
                for k, v in lat.items()
            },
            "fallbacks": fallbacks,
            "paths": paths,
            "gpu": gpu,
            "warnings": warnings,
            "prefer_dense": self.prefer_dense,
        }
        self.records.append(rec)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec

    def select(self, compressed: Any, dense: Any) -> Any:
        """``dense`` once a threshold tripped with ``fallback_to_dense``, else ``compressed``."""
        return dense if self.prefer_dense else compressed

    def close(self) -> None:
        log.removeHandler(self._fallbacks)
        if self._nvml is not None and hasattr(self._nvml, "nvmlShutdown"):
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        self.close()
