#!/usr/bin/env bash
# One prepared GPU check: Pallas kernel tests run natively (interpret=False), then the matmul
# benchmark at K = N = 8192; writes OUTDIR/gpu_check.json (device, jax version, commit, test
# summary, benchmark rows) beside the raw logs.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Runs from the source tree (PYTHONPATH=.) under a preinstalled jax with the CUDA plugin, no
# network. Budget: tests <= 180 s, benchmark <= 240 s (well under 8 minutes in all).
# Knobs for a smoke run elsewhere: GPU_CHECK_SIZES (default 8192), GPU_CHECK_MS (default
# "1 4 16 64"), GPU_CHECK_REPS (default 30), PYTHON (default python).
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export LTJAX_PALLAS_INTERPRET=0
PY=${PYTHON:-python}
SIZES=${GPU_CHECK_SIZES:-8192}
MS=${GPU_CHECK_MS:-1 4 16 64}
REPS=${GPU_CHECK_REPS:-30}
START=$(date +%s)

echo "== device"
"$PY" -c "import jax; print(jax.__version__, jax.default_backend(), jax.devices())" 2>&1 | tee "$OUT/device.log"

echo "== Pallas kernel tests, native (LTJAX_PALLAS_INTERPRET=0)"
shopt -s nullglob
TESTS=(tests/test_pallas*.py)
if [ ${#TESTS[@]} -gt 0 ]; then
  timeout 180 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" tests/test_ops.py \
    --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  TEST_RC=$?
else
  echo "no tests/test_pallas*.py in this tree" > "$OUT/tests.log"
  TEST_RC=-1
fi
tail -3 "$OUT/tests.log"
TEST_END=$(date +%s)

echo "== benchmark K=N=$SIZES M=$MS"
# shellcheck disable=SC2086
timeout 240 "$PY" -m benchmarks.matmul --sizes $SIZES --ms $MS --reps "$REPS" \
  --out "$OUT/matmul_bench.json" --note "gpu_check.sh" 2>&1 | tee "$OUT/bench.log"
BENCH_RC=${PIPESTATUS[0]}
END=$(date +%s)

"$PY" - "$OUT" "$TEST_RC" "$BENCH_RC" "$START" "$TEST_END" "$END" <<'PYEOF'
import json, os, subprocess, sys
import xml.etree.ElementTree as ET

out, test_rc, bench_rc, t0, t1, t2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *map(int, sys.argv[4:7])

def commit():
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return open("COMMIT").read().strip() if os.path.exists("COMMIT") else "unknown"

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
bench = json.load(open(bench_path)) if os.path.exists(bench_path) else None
result = dict(device=device, backend=backend, jax_version=jax_version, commit=commit(),
              env={"LTJAX_PALLAS_INTERPRET": os.environ.get("LTJAX_PALLAS_INTERPRET")},
              seconds={"tests": t1 - t0, "benchmark": t2 - t1},
              tests=tests, benchmark_rc=bench_rc, benchmark=bench)
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(result, f, indent=1)
print(f"wrote {os.path.join(out, 'gpu_check.json')}: device={device} jax={jax_version} "
      f"tests_rc={test_rc} bench_rc={bench_rc}")
PYEOF
