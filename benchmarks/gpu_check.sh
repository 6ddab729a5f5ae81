#!/usr/bin/env bash
# One prepared GPU check, in this order (what #3 still needs measured first, so a check cut short
# by its deadline loses the least):
#   1. the CUDA kernels' library (ltjax/ffi/cuda/_ltjax_cuda.so, git-ignored): kept if carried, else
#      built here with nvcc (`python -m ltjax.ffi.cuda --build`, ~15 s; OUTDIR/cuda_build.log);
#   2. the Pallas and CUDA kernel tests and the op tests, natively (interpret=False), with the
#      built-in block sizes (or a carried $LTJAX_PALLAS_TUNED);
#   3. the CUDA kernels against the Pallas kernels and the dense dots (benchmarks.cuda_kernels:
#      int8 and bitmask_int8, M = 1, 4, 16, with and without the row index, both kernels where
#      both apply);
#   4. the matmul and unpack benchmark at K = N = 8192 (int8, int4 and bitmask_int8 against the bf16 and
#      f32 dots, the decompress-then-dot path and, for int8, the plain-XLA int8 dot, in one run);
#   5. decode end to end (benchmarks.decode, bf16 activations): dense bf16, int8 and int4 rows of a
#      SmolLM2-135M-shaped and a Llama-3.2-1B-shaped model of random weights (the real file does
#      not travel), tok/s, compiled step memory, and how much of a token the weight matmuls take;
#   6. a block-size sweep of the Pallas kernels, the fastest candidate of each group written as a
#      tuned-table file (OUTDIR/tuned.json, for the built-in table or $LTJAX_PALLAS_TUNED later).
# Writes OUTDIR/gpu_check.json (device, jax version, commit, every stage's result) beside the raw
# logs (14 files in all).
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Runs from the source tree (PYTHONPATH=.) under a preinstalled jax with the CUDA plugin, no
# network. Each stage has a time limit (build 90 s, tests 180, CUDA benchmark 150, benchmark 180,
# decode GPU_CHECK_DECODE_S, sweep GPU_CHECK_SWEEP_S + 30), cut to what is left of
# GPU_CHECK_TOTAL_S (default 540: the whole check within 9 minutes; about 4 without the decode
# stage in practice on an H200). The benchmarks rewrite their
# JSON after every row, so a stage cut short still reports what it measured.
# ltjax's own dependencies must import there (crc32c is not in the GPU image: carry its wheel,
# see benchmarks/README.md).
# Knobs for a smoke run elsewhere: GPU_CHECK_SIZES (default 8192), GPU_CHECK_MS (default
# "1 4 16 64"), GPU_CHECK_REPS (default 20), GPU_CHECK_SWEEP_ARGS (extra sweep options, e.g.
# "--only bitmask int8_matmul/64/float32"), GPU_CHECK_SWEEP_S (default 100; 0 skips the sweep),
# GPU_CHECK_BENCH_S (default 180; 0 skips the benchmark), GPU_CHECK_CUDA_S (default 150; 0 skips the
# CUDA benchmark), GPU_CHECK_BUILD_S (default 90; 0 skips the library's build), GPU_CHECK_DECODE_S
# (default 200 for both models; 0 skips the stage), GPU_CHECK_DECODE_ARGS (extra benchmarks.decode
# options, e.g. "--quick"), GPU_CHECK_TOTAL_S (default 540), GPU_CHECK_TESTS_K (a pytest -k
# filter), PYTHON (default python).
# tests/test_bench.py runs it on the CPU with every stage but a few tests skipped: its plumbing.
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# A stage that is skipped or cut short must not report an earlier run's file as its own.
rm -f "$OUT"/{gpu_check.json,cuda_kernels.json,matmul_bench.json,sweep.json,tuned.json,tests.xml,decode_*.json}
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export LTJAX_PALLAS_INTERPRET=0
PY=${PYTHON:-python}
SIZES=${GPU_CHECK_SIZES:-8192}
MS=${GPU_CHECK_MS:-1 4 16 64}
REPS=${GPU_CHECK_REPS:-20}
SWEEP_S=${GPU_CHECK_SWEEP_S:-100}
BENCH_S=${GPU_CHECK_BENCH_S:-180}
START=$(date +%s)
# Every stage's time limit is also cut to what is left of GPU_CHECK_TOTAL_S (default 540 s: the
# whole check, JSON included, in 9 minutes), keeping 15 s for the JSON.
DEADLINE=$((START + ${GPU_CHECK_TOTAL_S:-540}))
cap() { local left=$((DEADLINE - $(date +%s) - 15)); [ "$left" -lt 5 ] && left=5; echo $(( $1 < left ? $1 : left )); }

echo "== device"
DEVICE=$({ nvidia-smi -L 2>&1 | head -2
  "$PY" -c "import jax; print(jax.__version__, jax.default_backend(), jax.devices())" 2>&1; })
echo "$DEVICE"

echo "== CUDA kernels' library"
if [ "${GPU_CHECK_BUILD_S:-90}" -le 0 ]; then
  echo "build skipped (GPU_CHECK_BUILD_S=0)" | tee "$OUT/cuda_build.log"
elif [ -f ltjax/ffi/cuda/_ltjax_cuda.so ]; then
  echo "present (carried)" | tee "$OUT/cuda_build.log"
elif command -v nvcc > /dev/null; then
  timeout "$(cap "${GPU_CHECK_BUILD_S:-90}")" "$PY" -m ltjax.ffi.cuda --build ltjax/ffi/cuda/_ltjax_cuda.so > "$OUT/cuda_build.log" 2>&1
  echo "nvcc build rc=$?" | tee -a "$OUT/cuda_build.log"
else
  echo "no nvcc and no carried ltjax/ffi/cuda/_ltjax_cuda.so" | tee "$OUT/cuda_build.log"
fi
BUILD_END=$(date +%s)

echo "== Pallas and CUDA kernel and op tests, native (LTJAX_PALLAS_INTERPRET=0)"
shopt -s nullglob
TESTS=(tests/test_pallas*.py tests/test_gemv.py tests/ops/test_*.py)  # tests/ops: each op's battery, Pallas native
PAR=()
# Several pytest workers share the one GPU: no preallocation, and compiles (CPU-bound) overlap.
if "$PY" -c "import xdist" 2>/dev/null; then PAR=(-n 8); fi
if [ ${#TESTS[@]} -gt 0 ]; then
  KSEL=()
  if [ -n "${GPU_CHECK_TESTS_K:-}" ]; then KSEL=(-k "$GPU_CHECK_TESTS_K"); fi
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$(cap 180)" "$PY" -m pytest -q -p no:cacheprovider "${PAR[@]}" "${KSEL[@]}" \
    "${TESTS[@]}" --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  TEST_RC=$?
else
  echo "no tests/test_pallas*.py in this tree" > "$OUT/tests.log"
  TEST_RC=-1
fi
tail -3 "$OUT/tests.log"
TESTS_END=$(date +%s)

CUDA_S=${GPU_CHECK_CUDA_S:-150}
if [ "$CUDA_S" -gt 0 ]; then
  echo "== CUDA kernels against Pallas and the dense dots (benchmarks.cuda_kernels), K=N=$SIZES"
  # shellcheck disable=SC2086
  timeout "$(cap "$CUDA_S")" "$PY" -m benchmarks.cuda_kernels --sizes $SIZES --reps "$REPS" \
    --out "$OUT/cuda_kernels.json" 2>&1 | tee "$OUT/bench_cuda.log"
fi
CUDA_END=$(date +%s)

if [ "$BENCH_S" -gt 0 ]; then
  echo "== benchmark K=N=$SIZES M=$MS"
  # shellcheck disable=SC2086
  timeout "$(cap "$BENCH_S")" "$PY" -m benchmarks.matmul --sizes $SIZES --ms $MS --reps "$REPS" \
    --out "$OUT/matmul_bench.json" --note "gpu_check.sh" 2>&1 | tee "$OUT/bench.log"
  BENCH_RC=${PIPESTATUS[0]}
else
  echo "benchmark skipped (GPU_CHECK_BENCH_S=0)" | tee "$OUT/bench.log"
  BENCH_RC=-1
fi
BENCH_END=$(date +%s)

DECODE_S=${GPU_CHECK_DECODE_S:-200}
if [ "$DECODE_S" -gt 0 ]; then
  echo "== decode end to end (benchmarks.decode, random weights): SmolLM2-135M and Llama-3.2-1B shapes"
  # a third of the time for the small model, the rest for the 1 B one
  # shellcheck disable=SC2086
  timeout "$(cap $((DECODE_S / 3)))" "$PY" -m benchmarks.decode --shape smollm2-135m --rows dense,int8,int4 \
    --rounds 3 --steps 32 --out "$OUT/decode_smollm2-135m.json" ${GPU_CHECK_DECODE_ARGS:-} 2>&1 | tee -a "$OUT/decode.log"
  # shellcheck disable=SC2086
  timeout "$(cap $((DECODE_S - DECODE_S / 3)))" "$PY" -m benchmarks.decode --shape llama-1b --rows dense,int8,int4 \
    --rounds 3 --steps 32 --out "$OUT/decode_llama-1b.json" ${GPU_CHECK_DECODE_ARGS:-} 2>&1 | tee -a "$OUT/decode.log"
else
  echo "decode skipped (GPU_CHECK_DECODE_S=0)" | tee "$OUT/decode.log"
fi
DECODE_END=$(date +%s)

if [ "$SWEEP_S" -gt 0 ]; then
  echo "== block-size sweep (${SWEEP_S} s), fastest per group -> tuned.json"
  timeout "$(cap $((SWEEP_S + 30)))" "$PY" -m benchmarks.pallas_sweep --budget "$SWEEP_S" --reps "$REPS" \
    --out "$OUT/sweep.json" --write-tuned "$OUT/tuned.json" ${GPU_CHECK_SWEEP_ARGS:-} > "$OUT/sweep.log" 2>&1
  SWEEP_RC=$?
  tail -2 "$OUT/sweep.log"
else
  echo "sweep skipped (GPU_CHECK_SWEEP_S=0)" > "$OUT/sweep.log"
  SWEEP_RC=-1
fi
END=$(date +%s)

export GPU_CHECK_DEVICE="$DEVICE"
"$PY" - "$OUT" "$TEST_RC" "$BENCH_RC" "$SWEEP_RC" "$START" "$BUILD_END" "$TESTS_END" "$CUDA_END" "$BENCH_END" "$DECODE_END" "$END" <<'PYEOF'
import json, os, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]
test_rc, bench_rc, sweep_rc, t0, t_build, t_tests, t_cuda, t_bench, t_decode, t_end = map(int, sys.argv[2:12])

try:
    import jax
    device, jax_version, backend = jax.devices()[0].device_kind, jax.__version__, jax.default_backend()
except Exception as e:  # a broken install is itself the finding
    device, jax_version, backend = f"unavailable: {e}", "unknown", "unknown"

tests = {"rc": test_rc, "log_tail": open(os.path.join(out, "tests.log")).read()[-2000:]}
xml = os.path.join(out, "tests.xml")
if os.path.exists(xml):
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    tests["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None]
bench_path = os.path.join(out, "matmul_bench.json")
load = lambda p: json.load(open(p)) if os.path.exists(p) else None
bench, sweep = load(bench_path), load(os.path.join(out, "sweep.json"))
cuda_bench = load(os.path.join(out, "cuda_kernels.json"))
cuda_build = open(os.path.join(out, "cuda_build.log")).read()[-2000:] if os.path.exists(os.path.join(out, "cuda_build.log")) else None
try:  # a COMMIT file, written before the tree was sent, wins over a copied .git (seen stale there)
    from benchmarks._common import git_info
    git = git_info()
except Exception as e:
    git = {"commit": f"unknown: {e}"}
result = dict(device=device, backend=backend, jax_version=jax_version,
              commit=git.get("commit_file") or git["commit"], git=git,
              env={k: os.environ.get(k) for k in ("LTJAX_PALLAS_INTERPRET", "GPU_CHECK_SWEEP_ARGS", "GPU_CHECK_TESTS_K",
                                                   "GPU_CHECK_SWEEP_S", "GPU_CHECK_BENCH_S", "GPU_CHECK_CUDA_S", "GPU_CHECK_BUILD_S",
                                                   "GPU_CHECK_DECODE_S", "GPU_CHECK_DECODE_ARGS")},
              device_probe=os.environ.get("GPU_CHECK_DEVICE"), tuned_table=os.environ.get("LTJAX_PALLAS_TUNED"),
              seconds={"cuda_build": t_build - t0, "tests": t_tests - t_build, "cuda_benchmark": t_cuda - t_tests,
                       "benchmark": t_bench - t_cuda, "decode": t_decode - t_bench, "sweep": t_end - t_decode},
              tests=tests, benchmark_rc=bench_rc, benchmark=bench,
              decode={s: load(os.path.join(out, f"decode_{s}.json")) for s in ("smollm2-135m", "llama-1b")}, cuda_build=cuda_build, cuda_benchmark=cuda_bench, sweep_rc=sweep_rc, sweep=sweep,
              tuned=load(os.path.join(out, "tuned.json")))
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(result, f, indent=1)
print(f"wrote {os.path.join(out, 'gpu_check.json')}: device={device} jax={jax_version} "
      f"tests_rc={test_rc} bench_rc={bench_rc} sweep_rc={sweep_rc}")
PYEOF
