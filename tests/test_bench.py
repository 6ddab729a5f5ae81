"""The benchmark harness: discovery, a --quick run's JSON schema, its plots. No speed is asserted."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from benchmarks import run as R  # noqa: E402

FAST = ["gemm_overhead", "effective_memory"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = R.main(["--quick", "--only", *FAST, "--out", str(out)])
    with open(out / "run.json") as f:
        return rc, out, json.load(f)


def test_discovery_finds_the_benchmarks_and_not_the_harness():
    found = R.discover()
    for name in ("claims", "effective_memory", "gemm_overhead", "pack", "activations"):
        assert name in found
    assert not set(found) & {"run", "plots", "make_readme", "_common", "_llama"}


def test_claims_runs_after_what_it_reads():
    names = list(R.order({n: f"benchmarks.{n}" for n in ("claims", "effective_memory", "gemm_overhead")}))
    assert names.index("claims") > names.index("gemm_overhead")
    assert names.index("claims") > names.index("effective_memory")


def test_quick_run_json_is_valid(quick_run):
    rc, out, run = quick_run
    assert rc == 0, {n: e.get("error") for n, e in run["benchmarks"].items()}
    assert R.validate_run(run) == []
    assert set(run["benchmarks"]) == set(FAST)
    assert all(e["status"] == "ok" for e in run["benchmarks"].values())
    assert run["quick"] is True and run["git"]["commit"]
    for k in ("jax", "jaxlib", "flax", "numpy", "ltjax"):
        assert k in run["versions"]
    # Each benchmark's JSON sits beside run.json and is embedded in it.
    for name, e in run["benchmarks"].items():
        assert os.path.exists(out / e["json"])
        assert e["result"]["benchmark"] == name
    gemm = run["benchmarks"]["gemm_overhead"]["result"]
    assert {"M", "K", "codec", "t_ltjax_ms", "t_f32_ms", "t_bf16_ms", "overhead_vs_f32"} <= set(gemm["rows"][0])
    em = run["benchmarks"]["effective_memory"]["result"]
    assert {f["variant"] for f in em["fits"]} == {"dense_f32", "dense_bf16", "ltjax_int8", "ltjax_int8+kv8"}
    assert all(r["program_bytes"] > 0 for r in em["rows"])


def test_quick_run_draws_nonempty_plots(quick_run):
    _, out, run = quick_run
    assert set(run["plots"]) == {"throughput_vs_M", "ratio_vs_sparsity", "memory_dense_vs_compressed"}
    for p in run["plots"].values():
        path = out / p["file"]
        assert path.exists() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_logs_one_monitor_record(quick_run):
    _, out, run = quick_run
    lines = (out / "monitor.jsonl").read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec == run["monitor"]
    assert "benchmark/gemm_overhead" in rec["latency"]


def test_schema_validation_catches_problems(quick_run):
    _, _, run = quick_run
    bad = dict(run)
    del bad["git"]
    assert any("git" in e for e in R.validate_run(bad))
    bad = json.loads(json.dumps(run))
    bad["benchmarks"]["gemm_overhead"]["status"] = "fine"
    assert any("status" in e for e in R.validate_run(bad))


def test_unknown_benchmark_is_an_error(tmp_path, capsys):
    assert R.main(["--only", "no_such_bench", "--out", str(tmp_path)]) == 2
    assert "no_such_bench" in capsys.readouterr().err


def test_cli_bench_forwards_to_the_harness(capsys):
    from ltjax.cli import main

    assert main(["bench", "--list"]) == 0
    assert "gemm_overhead" in capsys.readouterr().out


def test_cli_bench_finds_the_checkout_of_the_imported_ltjax():
    """`ltjax bench` runs the benchmarks of the checkout the imported ltjax comes from (editable install)."""
    import benchmarks
    from ltjax import cli

    root = Path(__file__).resolve().parents[1]
    assert cli.source_checkout() == root
    assert Path(benchmarks.__file__).resolve().parent == root / "benchmarks"


def test_cli_bench_from_an_installed_wheel_says_how_to_get_a_checkout(tmp_path, capsys):
    """A wheel carries only `ltjax`: the CLI module as a wheel lays it out (site-packages/ltjax/cli.py, no
    benchmarks/ beside it) finds no checkout, and `ltjax bench` says where the benchmarks are and exits 2."""
    import importlib.util
    import shutil

    from ltjax import cli

    site = tmp_path / "site-packages" / "ltjax"
    site.mkdir(parents=True)
    shutil.copy(cli.__file__, site / "cli.py")
    spec = importlib.util.spec_from_file_location("ltjax_cli_as_installed", site / "cli.py")
    installed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installed)
    assert installed.source_checkout() is None
    assert installed.main(["bench", "--list"]) == 2
    err = capsys.readouterr().err
    assert "source checkout" in err and str(site) in err and 'pip install -e ".[bench]"' in err


def test_only_ltjax_is_installed():
    """`models` and `benchmarks` are not top-level site-packages (their names would collide): they run from a
    checkout, where pytest (`pythonpath`) and `python -m` from the root find them."""
    import tomllib

    conf = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert conf["tool"]["scikit-build"]["wheel"]["packages"] == ["ltjax"]
    assert "." in conf["tool"]["pytest"]["ini_options"]["pythonpath"]


def test_make_readme_from_a_run(quick_run, tmp_path):
    from benchmarks import make_readme

    _, out, run = quick_run
    results = tmp_path / "results"
    os.makedirs(results / "r1")
    with open(results / "r1" / "run.json", "w") as f:
        json.dump(run, f)
    md = tmp_path / "README.md"
    assert make_readme.main(["--results", str(results), "--out", str(md), "--include-quick"]) == 0
    text = md.read_text()
    assert run["git"]["commit"] in text and "GEMM overhead" in text and "Effective memory" in text


def test_gpu_only_benchmark_is_skipped_with_its_reason(tmp_path):
    """A full (non --quick) run skips `pallas_sweep` off-GPU and says why, instead of failing."""
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the sweep runs")
    entry = R.run_one("pallas_sweep", "benchmarks.pallas_sweep", str(tmp_path), quick=False)
    assert entry["status"] == "skipped" and "'gpu' backend" in entry["reason"]


def test_sweep_writes_a_tuned_table_that_loads(tmp_path, monkeypatch):
    """pallas_sweep --quick (interpret mode, 256²) -> --write-tuned -> $LTJAX_PALLAS_TUNED round trip."""
    from benchmarks import pallas_sweep
    from ltjax import pallas as lp
    from ltjax._config import settings

    out, tuned = tmp_path / "sweep.json", tmp_path / "tuned.json"
    assert pallas_sweep.main(["--quick", "--out", str(out), "--write-tuned", str(tuned)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and not [r for r in rows if "error" in r]
    table = lp.load_tuned(str(tuned))
    keys = {k for k, _ in table}
    assert ("int8_matmul", "bfloat16", 16) in keys and ("bitmask_unpack_t", "*", 1 << 30) in keys
    monkeypatch.setenv(lp.TUNED_ENV, str(tuned))
    settings.cache_clear()
    assert lp.get_block_sizes("int8_matmul", 16, "bfloat16") == dict(table)[("int8_matmul", "bfloat16", 16)]


def test_paired_timing_alternates_and_bursts():
    """`paired_median_times`: warm-up of each function, then rounds that sample each function in turn,
    a sample being `burst` calls; one median per function (seconds per call)."""
    from benchmarks import _common

    calls = []
    fns = [lambda: calls.append("a") or 0, lambda: calls.append("b") or 0]
    times = _common.paired_median_times(fns, reps=3, burst=4, warmup=1, warmup_s=0.0)
    assert len(times) == 2 and all(t >= 0 for t in times)
    assert calls == ["a", "b"] + (["a"] * 4 + ["b"] * 4) * 3


def test_matmul_benchmark_paired_rows(tmp_path):
    """`benchmarks.matmul --burst`: every row carries its paired times against the dense dot of its dtype."""
    from benchmarks import matmul

    out = tmp_path / "mm.json"
    assert matmul.main(["--quick", "--burst", "2", "--ms", "1", "--no-unpack", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert doc["burst"] == 2 and rows
    for r in rows:
        assert r["paired_dense"] == r["x_dtype"] and r["paired_burst"] == 2
        assert r["t_ltjax_paired_ms"] > 0 and r["t_dense_paired_ms"] > 0
        assert r["speedup_vs_dense_paired"] == pytest.approx(r["t_dense_paired_ms"] / r["t_ltjax_paired_ms"])


def test_occupancy_arithmetic():
    """`benchmarks.analysis.occupancy` on Hopper's per-SM limits, against hand-worked figures."""
    from benchmarks.analysis.occupancy import occupancy

    # 64 registers on 1 warp: 2048 registers a program; 32 by registers, 64 by warps, 32 by blocks.
    o = occupancy(64, 1, 512, 4096)
    assert (o["programs_per_sm"], o["warps_per_sm"]) == (32, 32) and o["waves"] == pytest.approx(4096 / (32 * 132))
    # 168 registers -> 5376 a warp (already a multiple of 256): 12 programs; 1024 programs give an SM 8.
    o = occupancy(168, 1, 512, 1024)
    assert (o["programs_per_sm"], o["limited_by"], o["warps_per_sm"]) == (12, "regs", 8)
    # 190 registers -> 6080, rounded to 6144 a warp, 12288 for 2 warps: 5 programs.
    assert occupancy(190, 2, 16384, 1024)["programs_per_sm"] == 5
    # Shared memory binds: 100 KiB a program leaves room for 2.
    o = occupancy(32, 4, 100 * 1024, 64)
    assert (o["programs_per_sm"], o["limited_by"]) == (2, "shared")


def test_cuda_kernels_quick_rows_agree_with_the_reference(tmp_path):
    """`benchmarks.cuda_kernels --quick` (the kernels' CPU emulation off-GPU): every row is timed or
    says why it was skipped, and the CUDA op's output matches the reference. No speed is asserted."""
    from benchmarks import cuda_kernels as CK
    from ltjax.ffi import cuda

    path, why = cuda.emulation_library()
    if path is None:
        pytest.skip(f"the CUDA kernels' CPU emulation: {why}")
    out = tmp_path / "ck.json"
    assert CK.main(["--quick", "--ms", "1", "5", "--x-dtypes", "float32", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "cuda_kernels" and r["complete"] is True and CK.REQUIRES_BACKEND == "gpu"
    rows = r["rows"]
    assert len(rows) == 2 * len(CK.CASES)
    for row in rows:
        assert "error" not in row and "skipped" not in row and row["rel_diff"] < 1e-5, row
        assert row["kernel"] == ("mma" if row["M"] >= 2 else "gemv")
        if row["kernel"] == "mma":  # the K splits at other grid sizes, checked and timed
            assert row["mma_warps_rel_diff"] < 1e-5 and set(row["t_mma_warps_ms"]) == {"1024", "2048", "8192"}, row
        if row["M"] == 1:  # both kernels apply: the other one is timed and checked too
            assert row["alt_kernel"] == "mma" and row["alt_rel_diff"] < 1e-5 and row["t_alt_indexed_ms"] > 0, row
        assert row["indexed_rel_diff"] < 1e-5, row
        for k in ("t_cuda_ms", "t_cuda_indexed_ms", "t_bf16_ms", "t_f32_ms", "t_cuda_paired_ms", "t_dense_paired_ms"):
            assert row[k] > 0, k


def test_cuda_sass_analysis_finds_the_loop_and_the_aligned_path():
    """`benchmarks.analysis.cuda_sass` on a made-up SASS listing: the main loop is the longest backward
    branch's body, the aligned word path runs from the bounds check's target to its BSYNC, and a
    step on it is the loop without the byte-by-byte path between the two."""
    from benchmarks.analysis import cuda_sass as S

    listing = [
        (0x00, "MOV R1, R2"),
        (0x10, "LDG.E R3, desc[UR4][R4.64]"),        # loop start
        (0x20, "@!P0 BRA P1, 0x60"),                  # bounds check -> aligned path at 0x60
        (0x30, "LDG.E.U8 R5, desc[UR4][R6.64]"),     # byte-by-byte path (0x30-0x50)
        (0x40, "LDG.E.U8 R7, desc[UR4][R6.64+0x1]"),
        (0x50, "BRA 0x90"),
        (0x60, "LDG.E.CONSTANT R8, desc[UR4][R6.64]"),  # aligned path
        (0x70, "PRMT R9, R8, R10, RZ"),
        (0x80, "FFMA R11, R9, R12, R11"),
        (0x90, "BSYNC B1"),
        (0xa0, "@!P2 BRA 0x10"),                      # back to the loop start
        (0xb0, "EXIT"),
    ]
    r = S.analyse(listing)
    assert r["instructions"] == 12 and r["loop"]["instructions"] == 10
    assert r["aligned_word_path"]["instructions"] == 3 and r["aligned_word_path"]["histogram"]["PRMT"] == 1
    assert r["step_on_aligned_path"] == 10 - 3  # without the byte-by-byte path, 0x30-0x50
    inner = listing[:8] + [(0x88, "@P3 BRA 0x70")] + listing[8:]
    assert "step_on_aligned_path" not in S.analyse(inner)  # a loop inside the path: no static count


def test_gpu_check_script_writes_its_json_on_the_cpu(tmp_path):
    """`benchmarks/gpu_check.sh` off a GPU, every stage skipped but two CPU-only tests and the decode
    stage's --quick form: the script's
    plumbing (stage order, time caps, the one JSON with device, commit, every stage's result), so a
    lent GPU's few minutes are not lost to a broken script."""
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUILD_S": "0", "GPU_CHECK_SWEEP_S": "0",
           "GPU_CHECK_BENCH_S": "0", "GPU_CHECK_CUDA_S": "0", "GPU_CHECK_TOTAL_S": "400",
           "GPU_CHECK_DECODE_S": "240", "GPU_CHECK_DECODE_ARGS": "--quick",
           "GPU_CHECK_TESTS_K": "test_refusals_name_the_reason or test_int8_mma_splits_are_whole_steps"}
    (tmp_path / "cuda_kernels.json").write_text("{}")  # an earlier run's file: not this run's result
    proc = subprocess.run(["bash", os.path.join(root, "benchmarks", "gpu_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["backend"] == "cpu" and r["commit"] and r["jax_version"]
    assert r["tests"]["rc"] == 0 and r["tests"]["tests"] == 2 and r["tests"]["failed"] == [], r["tests"]
    assert "build skipped" in r["cuda_build"] and r["benchmark_rc"] == -1 and r["sweep_rc"] == -1
    assert r["cuda_benchmark"] is None and r["benchmark"] is None
    assert list(r["seconds"]) == ["cuda_build", "tests", "cuda_benchmark", "benchmark", "decode", "sweep"]
    for shape, d in r["decode"].items():  # --quick: the tiny shape, its three rows, each with its step memory
        assert d["shape"] == shape and [x["row"] for x in d["rows"]] == ["dense", "int8", "int4"], (shape, d)
        assert all(x["step_memory"]["argument_bytes"] > 0 and x["tok_s"] > 0 for x in d["rows"])
    assert all(v >= 0 for v in r["seconds"].values())


def test_benchmark_that_cannot_measure_here_is_skipped_with_its_reason(tmp_path, monkeypatch):
    """ffi_matmul without the CPU extension: a JSON saying why, and the run lists it as skipped
    (not failed), so `ltjax bench --quick` still exits 0 on a machine without a C++ compiler."""
    import ltjax.ffi.cpu as lffi

    monkeypatch.setattr(lffi, "available", lambda: False)
    monkeypatch.setattr(lffi, "unavailable_reason", lambda: "the C++ extension is not built (test)")
    entry = R.run_one("ffi_matmul", "benchmarks.ffi_matmul", str(tmp_path), quick=True)
    assert entry["status"] == "skipped", entry
    assert "not built (test)" in entry["reason"] and entry["result"]["rows"] == []


def test_effective_memory_headline_is_bytes_held(quick_run):
    """"24 GiB holds X GiB of bf16" compares bytes held (the step's arguments: weights + KV cache),
    each side fitted on the same measure; the compiled figure (XLA:CPU upcasts bf16 weights in
    temp memory) is a second, separately keyed one."""
    _, _, run = quick_run
    em = run["benchmarks"]["effective_memory"]["result"]
    for s in em["summary"]:
        gib = s["device_gib"]
        held = gib * s["ltjax_int8+kv8 [arguments only]"] / s["dense_bf16 [arguments only]"]
        assert s["effective_GiB ltjax_int8+kv8 [bytes held] vs dense_bf16"] == pytest.approx(held)
        comp = gib * s["ltjax_int8+kv8 [compiled]"] / s["dense_bf16 [compiled]"]
        assert s["effective_GiB ltjax_int8+kv8 [compiled] vs dense_bf16"] == pytest.approx(comp)
        assert f"holds {held:.0f} GiB of bf16" in s["headline"] and "bytes held" in s["headline"]


def test_readme_effective_memory_headline_is_bytes_held():
    """The generated table's bold headline is the bytes-held figure; the compiled one (a CPU
    artefact for bf16) stays as a labelled column, and the section says why."""
    from benchmarks import make_readme

    s = {"family": "fam", "device": "24GiB"}
    for v, held, compiled in (("dense_f32", 6e9, 6e9), ("dense_bf16", 12e9, 4e9), ("ltjax_int8", 22e9, 21e9),
                              ("ltjax_int8+kv8", 24e9, 23.5e9)):
        s[f"{v} [arguments only]"], s[f"{v} [compiled]"] = held, compiled
    run = {"backend": "cpu", "device_name": "cpu", "machine": {"cpu_model": "x"}, "date": "2026-12-07",
           "git": {"commit": "abc"}, "benchmarks": {"effective_memory": {"status": "ok", "result": {
               "backend": "cpu", "method": "m", "context": 2048, "weights_through": "w", "summary": [s]}}}}
    text = "\n".join(make_readme.memory_section(run))
    row = next(ln for ln in text.splitlines() if ln.startswith("| fam |"))
    assert "**48 GiB**" in row and "96 GiB" in row  # 24 x 24/12 vs bf16, 24 x 24/6 vs f32: bytes held
    assert "141 GiB" in row  # 24 x 23.5/4: compiled, in its own column
    header = next(ln for ln in text.splitlines() if ln.startswith("| family |"))
    assert "**effective, bytes held: vs bf16**" in header and "compiled (cpu)" in header
    assert "CPU artefact" in text


def test_decode_budget_quick_and_the_llama_bench_reader(tmp_path, monkeypatch):
    """`benchmarks.decode --quick`: one row per codec, its parts add up to the step, bandwidth measured;
    `llama_bench_run` reads llama-bench's JSON (a stand-in script printing its format) and its errors."""
    from benchmarks import decode

    out = tmp_path / "decode.json"
    assert decode.main(["--quick", "--rows", "dense,int8", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["bandwidth"]["gb_s"] > 0 and [r["row"] for r in res["rows"]] == ["dense", "int8"]
    for r in res["rows"]:
        assert np.isclose(r["matmuls_s"] + r["head_s"] + r["rest_s"], r["step_s"]) and r["tok_s"] > 0
        assert np.isclose(r["matmuls_gb_s"], r["matmul_weight_bytes"] / r["matmuls_s"] / 1e9)
        assert np.isclose(r["prefill_tok_s"], 128 / r["prefill_s"])
    int8 = res["rows"][1]
    assert int8["path"] in ("ffi", "xla")
    assert int8["matmul_weight_bytes"] < res["rows"][0]["matmul_weight_bytes"] / 2  # (kernels < 4096 stay dense)
    assert "tok_s" not in res["llama_cpp"] and res["llama_cpp"]["note"]
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\necho '[{\"n_prompt\": 128, \"n_gen\": 0, \"avg_ts\": 700.5}, "
                    "{\"n_prompt\": 0, \"n_gen\": 64, \"avg_ts\": 123.5}]'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LLAMA_BENCH", str(fake))
    assert decode.llama_bench() == str(fake)
    assert decode.llama_bench_run(str(fake), "m.gguf", 64, 128, 2) == (123.5, 700.5)
    fake.write_text("#!/bin/sh\necho 'no model' >&2\nexit 3\n")
    with pytest.raises(RuntimeError, match="exited 3: no model"):
        decode.llama_bench_run(str(fake), "m.gguf", 64, 128, 2)
    with pytest.raises(SystemExit):
        decode.main(["--quick", "--rows", "dense,int3"])
    with pytest.raises(SystemExit):
        decode.main(["--quick", "--rows", "file"])  # the tiny random model has no file


def test_decode_file_row_against_llama_bench(tmp_path, monkeypatch):
    """``--gguf`` with the ``file`` row: the GGUF's own tensors (its Q8_0 embedding as int8) beside a
    compressed row, and llama-bench (a stand-in) run on that same file, its ratios in the JSON."""
    from benchmarks import decode
    from tests.test_llama import LOADER_CFG, _hf_tensors, _write_gguf

    path = str(tmp_path / "m.gguf")
    _write_gguf(path, LOADER_CFG, _hf_tensors(LOADER_CFG))
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\necho \"$@\" > " + str(tmp_path / "args") + "\n"
                    "echo '[{\"n_prompt\": 8, \"n_gen\": 0, \"avg_ts\": 1000.0}, "
                    "{\"n_prompt\": 0, \"n_gen\": 64, \"avg_ts\": 100.0}]'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LLAMA_BENCH", str(fake))
    out = tmp_path / "d.json"
    assert decode.main(["--gguf", path, "--rows", "int8,file", "--rounds", "1", "--steps", "2", "--prompt", "8",
                        "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["row"] for r in res["rows"]] == ["int8", "file"]
    assert (tmp_path / "args").read_text().split()[:4] == ["-m", path, "-p", "8"]
    assert res["llama_cpp"]["tok_s"] == 100.0 and res["llama_cpp"]["prefill_tok_s"] == 1000.0
    for r in res["rows"]:
        assert np.isclose(r["tok_s_vs_llama_cpp"], r["tok_s"] / 100.0)
        assert np.isclose(r["prefill_vs_llama_cpp"], 8 / r["prefill_s"] / 1000.0)
    assert res["rows"][1]["head_weight_bytes"] < LOADER_CFG.vocab * LOADER_CFG.dim * 2  # the Q8_0 embedding: int8
    with pytest.raises(SystemExit):
        decode.main(["--gguf", str(tmp_path / "missing.gguf"), "--rows", "file"])


def test_decode_shape_layers_are_distinct_copies_of_one_drawn_layer():
    """``--shape``: every layer holds its own buffers (compressed leaves included) with layer 0's
    values, so a step streams n_layers layers' bytes, none read from another layer's cache lines."""
    import ltjax
    from benchmarks import decode
    from models import generate as gen, llama

    cfg = decode.one_layer(gen.TINY_CONFIG)
    assert cfg.n_layers == 1 and decode.SHAPES["llama-1b"].n_layers == 16
    params = decode.replicated_params(gen.compress_params(llama.init_params(cfg, 3), "int8"), 3)
    assert sorted(k for k in params if k.startswith("layers_")) == ["layers_0", "layers_1", "layers_2"]
    is_ct = lambda x: isinstance(x, ltjax.CompressedTensor)  # noqa: E731
    leaves = [jax.tree_util.tree_leaves(params[f"layers_{i}"]) for i in range(3)]
    assert any(is_ct(x) for x in jax.tree_util.tree_leaves(params["layers_2"], is_leaf=is_ct))
    for a, b in zip(leaves[0], leaves[2]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if a.size:
            assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
