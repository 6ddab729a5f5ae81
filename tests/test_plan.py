"""The byte-budget planner: `ltjax.plan`, `Policy(max_bytes=, bits=)`, applying a plan, the CLI flags.

Fresh random weights with a spread of sensitivities (heavy-tailed rows, sparse tensors, plain
Gaussians), where a mixed assignment has something to win over a uniform one.
"""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ltjax
from ltjax._plan import solve


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    heavy = rng.standard_normal((256, 128)).astype(np.float32)
    heavy *= rng.lognormal(0.0, 1.5, (256, 1)).astype(np.float32)  # rows of very different magnitude
    heavy[rng.random(heavy.shape) < 0.002] *= 30.0  # and outliers: int4's groups suffer, int8 less
    sparse = rng.standard_normal((256, 128)).astype(np.float32)
    sparse[rng.random(sparse.shape) < 0.95] = 0.0
    return {
        "a": {"kernel": rng.standard_normal((256, 128)).astype(np.float32), "bias": np.zeros(128, np.float32)},
        "b": {"kernel": heavy},
        "c": {"kernel": rng.standard_normal((128, 384)).astype(np.float32)},
        "d": {"kernel": sparse},
        "e": {"kernel": (rng.standard_t(3, (512, 64)) * 0.1).astype(np.float32)},
    }


def _planned_bytes(out, plan):
    leaves = dict(ltjax._analyze.tree_leaves_with_paths(out))
    return sum(int(leaves[e.path].nbytes) for e in plan.entries)


@pytest.mark.parametrize("bits", [4.2, 4.6, 5.5, 8.5, 12.0])
def test_the_plan_meets_its_budget_and_applies_exactly(bits):
    tree = _tree()
    plan = ltjax.plan(tree, bits_per_weight=bits)
    assert plan.bits_per_weight <= bits and plan.nbytes <= plan.budget_nbytes
    out, rep = ltjax.compress_tree(tree, plan, return_report=True)
    assert _planned_bytes(out, plan) == plan.nbytes  # the bytes the planner counted are the bytes stored
    assert out["a"]["bias"] is tree["a"]["bias"]  # below min_ndim: left as it is, counted as fixed
    for e in plan.entries:
        r = next(l for l in rep.leaves if l.path == e.path)
        assert r.codec == e.option.codec and r.reason.startswith("plan: ")
        if e.option.codec != "dense":
            assert r.rel_error == pytest.approx(math.sqrt(e.option.error), rel=1e-4, abs=1e-7)


def test_budget_bytes_counts_the_whole_tree():
    tree = _tree()
    total = sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))
    budget = total // 6
    plan = ltjax.plan(tree, budget_bytes=budget)
    out = ltjax.compress_tree(tree, plan)
    stored = sum(int(x.nbytes) for x in jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, ltjax.CompressedTensor)))
    assert stored == plan.total_nbytes <= budget
    assert plan.fixed_nbytes == tree["a"]["bias"].nbytes


def test_more_bytes_never_more_damage():
    tree = _tree(1)
    damages = []
    first = ltjax.plan(tree, bits_per_weight=4.15)
    for bits in np.linspace(4.15, 14.0, 40):
        plan = first.replan(bits_per_weight=float(bits))  # the same measured options, another budget
        assert plan.bits_per_weight <= bits
        damages.append(plan.damage)
    assert all(b <= a for a, b in zip(damages, damages[1:])), damages
    assert damages[0] > damages[-1]
    for bits in (4.3, 6.0, 9.0):  # replan is plan
        again = ltjax.plan(tree, bits_per_weight=bits)
        assert [e.chosen for e in again.entries] == [e.chosen for e in first.replan(bits_per_weight=bits).entries]


def test_mixing_beats_uniform_int4_at_the_same_bytes():
    tree = _tree(2)
    g64 = ltjax.Policy(codec="int4", group=64)
    uniform, rep = ltjax.compress_tree(tree, g64, return_report=True)
    bytes_uniform = sum(l.nbytes for l in rep.leaves if l.codec == "int4")
    plan = ltjax.plan(tree, budget_bytes=bytes_uniform + tree["a"]["bias"].nbytes)
    assert plan.nbytes <= bytes_uniform
    # the damage of uniform int4 g64, on the planner's own measure, and measured on what is stored
    uniform_damage = sum(l.rel_error**2 for l in rep.leaves if l.codec == "int4")
    out, rep_plan = ltjax.compress_tree(tree, plan, return_report=True)
    plan_damage = sum((l.rel_error or 0.0) ** 2 for l in rep_plan.leaves if l.path != "a/bias")
    assert plan_damage == pytest.approx(plan.damage, rel=1e-4)
    assert plan_damage < 0.75 * uniform_damage, (plan_damage, uniform_damage)  # measured: 0.031 vs 0.052
    chosen = {e.path: e.option.label for e in plan.entries}
    assert chosen["d/kernel"] in ("bitmask", "bitmask_int8")  # 95% zeros: 2.6 / 1.4 bits per weight
    print(plan)


def test_a_budget_no_assignment_meets_names_the_smallest():
    tree = _tree()
    smallest = ltjax.plan(tree, bits_per_weight=64.0)
    lo = sum(min(o.nbytes for o in e.options) for e in smallest.entries)
    with pytest.raises(ValueError, match=f"smallest assignment .* is {lo} bytes"):
        ltjax.plan(tree, bits_per_weight=3.0)
    with pytest.raises(ValueError, match=f"the whole tree {lo + smallest.fixed_nbytes} bytes"):
        ltjax.plan(tree, budget_bytes=lo + smallest.fixed_nbytes - 1)
    ltjax.plan(tree, budget_bytes=lo + smallest.fixed_nbytes)  # exactly the smallest: feasible
    with pytest.raises(ValueError, match="exactly one of"):
        ltjax.plan(tree, bits_per_weight=4.0, budget_bytes=10**6)
    with pytest.raises(ValueError, match="max_bytes=.* or bits=.*not both"):
        ltjax.Policy(max_bytes=10, bits=4)
    with pytest.raises(ValueError, match="must be a positive number"):
        ltjax.Policy(bits=-1)


def test_policy_budget_is_the_planner():
    tree = _tree()
    via_policy, rep = ltjax.compress_tree(tree, ltjax.Policy(bits=5.0), return_report=True)
    plan = ltjax.plan(tree, bits_per_weight=5.0)
    for e in plan.entries:
        leaf = dict(ltjax._analyze.tree_leaves_with_paths(via_policy))[e.path]
        codec = leaf.codec if isinstance(leaf, ltjax.CompressedTensor) else "dense"
        assert codec == e.option.codec
    assert _planned_bytes(via_policy, plan) == plan.nbytes


def test_codecs_and_groups_restrict_the_options():
    tree = _tree()
    plan = ltjax.plan(tree, bits_per_weight=6.0, policy=ltjax.Policy(codecs=("int8", "int4")), groups=(128,),
                      asymmetric=(False,))
    labels = {o.label for e in plan.entries for o in e.options}
    assert labels == {"int8", "int4 g128 sym"}
    assert "dense" not in labels  # "raw" not in codecs: no leaf may stay dense


def test_table_and_json():
    plan = ltjax.plan(_tree(), bits_per_weight=5.0)
    text = str(plan)
    for word in ("choice", "bits/w", "rel err", "why", "TOTAL planned", "budget"):
        assert word in text
    d = json.loads(plan.to_json())
    assert d["bits_per_weight"] == pytest.approx(plan.bits_per_weight)
    assert {e["path"] for e in d["entries"]} == {"a/kernel", "b/kernel", "c/kernel", "d/kernel", "e/kernel"}


def test_solve_is_exact_on_a_small_case():
    costs = [[0, 3, 5], [0, 2], [0, 4, 6]]
    errors = [[5.0, 2.0, 1.0], [3.0, 0.5], [4.0, 1.0, 0.0]]
    import itertools

    for budget in range(0, 16):
        best = min((sum(errors[i][j] for i, j in enumerate(c)), c) for c in itertools.product(*map(
            lambda c: range(len(c)), costs)) if sum(costs[i][j] for i, j in enumerate(c)) <= budget)
        got = solve(costs, errors, budget)
        assert sum(costs[i][j] for i, j in enumerate(got)) <= budget
        assert sum(errors[i][j] for i, j in enumerate(got)) == pytest.approx(best[0])


def test_with_calibration_the_damage_is_the_output_error():
    rng = np.random.default_rng(3)
    k = 128
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.diag(rng.uniform(0.1, 4.0, k))
    x = (rng.standard_normal((600, k)) @ mix).astype(np.float32)
    tree = {"l1": {"kernel": rng.standard_normal((k, 256)).astype(np.float32)},
            "l2": {"kernel": rng.standard_normal((k, 64)).astype(np.float32)}}
    stats = {"l1/kernel": ltjax.InputStats.from_inputs(x)}
    plan = ltjax.plan(tree, bits_per_weight=4.6, calibration=stats)
    e1 = plan.entry("l1/kernel")
    assert all(o.calibrated for o in e1.options if o.codec != "dense")
    assert any(o.label.endswith("gptq") for o in e1.options)
    out, rep = ltjax.compress_tree(tree, plan, return_report=True)
    r1 = next(l for l in rep.leaves if l.path == "l1/kernel")
    assert r1.out_error == pytest.approx(math.sqrt(e1.option.error), rel=1e-3)
    w = tree["l1"]["kernel"]
    y = x @ w
    got = float(np.linalg.norm(x @ np.asarray(ltjax.decompress(out["l1"]["kernel"])) - y) / np.linalg.norm(y))
    assert got == pytest.approx(r1.out_error, rel=1e-3)
    assert plan.entry("l2/kernel").options[0].calibrated is False  # no statistics: the weight error


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        blk = nn.scan(_Blk, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
        x, _ = blk(name="stack")(x, None)
        return nn.DenseGeneral((4, 32), name="split")(x)


class _Blk(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(128, name="fc")(x)), None


def test_compress_params_applies_a_plan_with_stacks_and_layouts():
    model = _Scanned()
    x = jax.random.normal(jax.random.key(0), (3, 128))
    params = model.init(jax.random.key(1), x)["params"]
    kw = dict(model=model, args=(x,))
    stats = ltjax.nn.calibration_stats(model, params, [(x,) for _ in range(30)], progress=False)
    plan = ltjax.plan(params, bits_per_weight=5.0, calibration=stats, **kw)
    stack = plan.entry("stack/fc/kernel")
    assert stack.layers == 4 and stack.shape == (4, 128, 128)
    assert {o.codec for o in stack.options} <= {"dense", "int8", "int4"}  # stackable only
    assert plan.entry("split/kernel").shape == (128, 128)  # the DenseGeneral's [K, N] kernel
    cparams, rep = ltjax.nn.compress_params(params, plan, return_report=True, **kw)
    leaves = dict(ltjax._analyze.tree_leaves_with_paths(cparams))
    assert sum(int(leaves[e.path].nbytes) for e in plan.entries) == plan.nbytes
    with ltjax.nn.intercept():
        y = model.apply({"params": cparams}, x)
    assert y.shape == (3, 4, 32)
    # the same through the policy
    cparams2 = ltjax.nn.compress_params(params, ltjax.Policy(bits=5.0), calibration=stats, **kw)
    assert jax.tree.structure(cparams2, is_leaf=lambda v: isinstance(v, ltjax.CompressedTensor)) == \
        jax.tree.structure(cparams, is_leaf=lambda v: isinstance(v, ltjax.CompressedTensor))


def test_cli_compress_with_a_budget(tmp_path, capsys):
    from safetensors.numpy import save_file

    from ltjax.cli import main

    tree = _tree()
    flat = {p.replace("/", "."): v for p, v in ltjax._analyze.tree_leaves_with_paths(tree)}
    src = tmp_path / "w.safetensors"
    save_file(flat, str(src))
    out = tmp_path / "w.lt"
    assert main(["compress", str(src), "-o", str(out), "--bits", "5"]) == 0
    text = capsys.readouterr().out
    assert "plan: " in text
    loaded = ltjax.load(str(out))
    kernels = [v for k, v in loaded.items() if k.endswith("kernel")]
    bits = sum(int(v.nbytes) for v in kernels) * 8 / sum(int(np.prod(v.shape)) for v in kernels)
    assert bits <= 5.0
    total = sum(np.asarray(x).nbytes for x in flat.values())
    assert main(["compress", str(src), "-o", str(out), "--max-bytes", str(total // 6)]) == 0
    assert sum(int(v.nbytes) for v in ltjax.load(str(out)).values()) <= total // 6
    assert main(["compress", str(src), "-o", str(out), "--max-bytes", "1000"]) == 1
    assert "smallest assignment" in capsys.readouterr().err
