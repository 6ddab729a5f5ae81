"""The main job (`make demo`): compress a model, save, load, verify, and report honestly.

Today it runs on a randomly initialised Flax MLP with one pruned layer: it analyzes every
weight, compresses the tree losslessly and with an int8 budget, saves and reloads each
through the checksummed file format, verifies it, and compares the model's outputs.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ltjax


class MLP(nn.Module):
    widths: tuple[int, ...] = (1024, 1024, 1024, 10)

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = nn.Dense(w, name=f"dense_{i}")(x)
            if i < len(self.widths) - 1:
                x = nn.relu(x)
        return x


def _prune(params, path, fraction, rng):
    """Zeroes the smallest-magnitude ``fraction`` of one kernel (a stand-in for a pruned layer)."""
    k = np.asarray(params[path]["kernel"])
    thresh = np.quantile(np.abs(k), fraction)
    params[path]["kernel"] = jnp.asarray(np.where(np.abs(k) < thresh, 0.0, k).astype(k.dtype))
    return params


def mlp_output(params, x):
    """The dense model's output, computed from (decompressed) params."""
    dense = jax.tree_util.tree_map(
        lambda l: ltjax.decompress(l) if isinstance(l, ltjax.CompressedTensor) else l,
        params,
        is_leaf=lambda l: isinstance(l, ltjax.CompressedTensor),
    )
    return MLP().apply({"params": dense}, x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--error-budget", type=float, default=0.01, help="relative error allowed per tensor for the lossy run"
    )
    ap.add_argument("--out-dir", default=None, help="where to write the .lt files (default: a temp dir)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    model = MLP()
    x = jnp.asarray(rng.standard_normal((8, 784)).astype(np.float32))
    params = jax.device_get(model.init(jax.random.key(0), x)["params"])
    params = _prune(dict(params), "dense_1", 0.7, rng)
    y_dense = mlp_output(params, x)

    print("== ltjax demo: a randomly initialised 4-layer MLP (dense_1 pruned to 70% zeros) ==\n")
    print("-- analyze --")
    print(ltjax.analyze(params, error_budget=args.error_budget))

    out_dir = args.out_dir or tempfile.mkdtemp(prefix="ltjax-demo-")
    for label, policy in [
        ("lossless (auto, no error budget)", ltjax.Policy(min_size=1024)),
        (f"auto, error budget {args.error_budget}", ltjax.Policy(min_size=1024, error_budget=args.error_budget)),
    ]:
        ctree, report = ltjax.compress_tree(params, policy, return_report=True)
        path = os.path.join(out_dir, ("lossless" if policy.error_budget is None else "lossy") + ".lt")
        ltjax.save(path, ctree)
        summary = ltjax.verify(path)
        loaded = ltjax.load(path)
        y = mlp_output(loaded, x)
        err = float(jnp.linalg.norm(y - y_dense) / jnp.linalg.norm(y_dense))
        print(f"\n-- compress: {label} --")
        print(report)
        print(
            f"saved {path}: {summary['file_bytes']} bytes, verified {summary['tiles']} tiles; "
            f"reloaded model output rel. error vs dense = {err:.2e}"
            + (" (bit-exact)" if bool(jnp.array_equal(y, y_dense)) else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
