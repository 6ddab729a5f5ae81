"""ltjax.shard + ltjax.matmul on 8 simulated CPU devices (own process: XLA_FLAGS before jax starts)."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sharded_matmul_matches_and_gathers_no_dense_weight():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_sharding_check.py")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT ") :])
    for codec in ("int8", "raw"):
        r = res[codec]
        assert r["max_abs_diff"] <= 1e-4, r
        assert r["shard_shape"] == [128, 256], r  # each device: its 128 output channels, whole tiles
        assert all(0 <= s < r["dense_size"] for s in r["all_gather_sizes"]), r
    assert res["bad_tile_error"] and "tile" in res["bad_tile_error"], res
