"""Run with 8 simulated CPU devices (XLA_FLAGS set by tests/test_sharding.py); prints one JSON line."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ltjax


def main():
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("model",))
    rng = np.random.default_rng(7)
    K, N = 256, 1024
    w = rng.standard_normal((K, N)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((4, K)).astype(np.float32))
    out = {}
    for codec in ("int8", "raw"):
        ct = ltjax.compress(w, codec, tile=(64, 256))  # storage [N, K]: 1024/8 = 128 rows per device = 2 tiles
        sct = ltjax.shard(ct, NamedSharding(mesh, P(None, "model")))
        f = jax.jit(ltjax.matmul)
        y_ref = f(x, ct)
        y = f(x, sct)
        hlo = f.lower(x, sct).compile().as_text()
        gathers = []
        for line in hlo.splitlines():
            if "all-gather" in line and "=" in line:
                m = re.search(r"= \w+\[([\d,]*)\]", line)
                gathers.append(int(np.prod([int(d) for d in m.group(1).split(",") if d])) if m else -1)
        out[codec] = {
            "max_abs_diff": float(jnp.max(jnp.abs(y - y_ref))),
            "codes_spec": str((sct.codes if codec == "int8" else sct.values).sharding.spec),
            "shard_shape": list((sct.codes if codec == "int8" else sct.values).addressable_shards[0].data.shape),
            "all_gather_sizes": gathers,
            "dense_size": K * N,
            "out_spec": str(y.sharding.spec),
        }
    try:
        ltjax.shard(ltjax.compress(w, "int8"), NamedSharding(mesh, P(None, "model")))  # default tile: 256 rows
        out["bad_tile_error"] = None
    except ValueError as e:
        out["bad_tile_error"] = str(e)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
