"""ltjax.monitor with a fake NVML, and without one."""

import json
import logging
import types

import numpy as np
import pytest

import ltjax
from ltjax.monitor import Monitor, Thresholds


class FakeNVML:
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, temperature=60.0, power_mw=250_000, used=10, total=100):
        self.temperature, self.power_mw, self.used, self.total = temperature, power_mw, used, total
        self.shutdown = False

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetTemperature(self, h, kind):
        return self.temperature

    def nvmlDeviceGetPowerUsage(self, h):
        return self.power_mw

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=self.used, total=self.total)

    def nvmlShutdown(self):
        self.shutdown = True


def test_records_and_json_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    nv = FakeNVML()
    mon = Monitor(path, run="t", nvml=nv)
    rng = np.random.default_rng(0)
    lat = rng.uniform(0.001, 0.01, size=101)
    for v in lat:
        mon.record_latency("matmul", v)
    mon.record_throughput("decode", 2e9, 0.5)
    tree = {"w": ltjax.compress(rng.standard_normal((64, 64)).astype(np.float32), "int8")}
    ratio = mon.record_compression(tree)
    out = mon.timed("decompress", ltjax.decompress, tree["w"], nbytes=tree["w"].nbytes)
    assert out.shape == (64, 64)
    rec = mon.flush()
    line = json.loads(path.read_text().splitlines()[0])
    assert line == json.loads(json.dumps(rec))
    assert rec["latency"]["matmul"]["p50_ms"] == pytest.approx(np.percentile(lat, 50) * 1e3)
    assert rec["latency"]["matmul"]["p99_ms"] == pytest.approx(np.percentile(lat, 99) * 1e3)
    assert rec["throughput_GBps"]["decode"] == pytest.approx(4.0)
    assert rec["compression_ratio"]["model"] == pytest.approx(ratio) and ratio > 3.5
    assert rec["gpu"] == {"temperature_c": 60.0, "power_w": 250.0, "memory_used": 10, "memory_total": 100}
    assert rec["warnings"] == [] and not mon.prefer_dense
    assert mon.flush()["latency"] == {}  # a flush starts a new window
    mon.close()
    assert nv.shutdown


def test_threshold_warns_and_falls_back(caplog):
    nv = FakeNVML(temperature=91.0, used=99, total=100)
    mon = Monitor(None, nvml=nv, thresholds=Thresholds(temperature_c=85, memory_fraction=0.95), fallback_to_dense=True)
    with caplog.at_level(logging.WARNING, logger="ltjax"):
        rec = mon.flush()
    assert any("temperature 91" in w for w in rec["warnings"]) and any("memory" in w for w in rec["warnings"])
    assert "falling back to dense" in caplog.text
    assert mon.prefer_dense and mon.select("compressed", "dense") == "dense"
    mon.close()


def test_warn_only_without_fallback():
    mon = Monitor(None, nvml=FakeNVML(temperature=99.0))
    rec = mon.flush()
    assert rec["warnings"] and not mon.prefer_dense and mon.select("c", "d") == "c"
    mon.close()


def test_no_nvml_is_a_clean_noop(tmp_path):
    mon = Monitor(tmp_path / "m.jsonl", nvml=None)
    rec = mon.flush()
    assert rec["gpu"] is None and rec["warnings"] == []
    mon.close()


def test_counts_fallback_events():
    with Monitor(None, nvml=None) as mon:
        logging.getLogger("ltjax").warning("ltjax.matmul: falls back to the reference path (simulated)")
        logging.getLogger("ltjax").warning("unrelated message")
        rec = mon.flush()
    assert rec["fallbacks"] == ["ltjax.matmul: falls back to the reference path (simulated)"]
