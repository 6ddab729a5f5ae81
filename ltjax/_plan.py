"""The byte-budget planner: which tensors stay dense, which go to 8 or 4 bits (docs/int4.md, "Planner").

Every leaf a `Policy` selects gets each allowed option measured exactly (its stored bytes, scales
and checksums included, and its damage: the squared relative output error ``||X (W - Q)||^2 /
||X W||^2`` where calibration statistics exist, GPTQ codes for int4, else the weight error), then
one option per leaf is chosen so the total fits the budget with the least summed damage: a
multiple-choice knapsack, solved exactly by dynamic programming over bytes counted in small units
(fixed per tree, so a larger budget never yields more damage).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ltjax._calibrate import InputStats, gptq_int4, output_error
from ltjax._format import (
    INT4_GROUPS,
    CompressedTensor,
    Header,
    _dtype_name,
    _nonzero_bits,
    group_reason,
    int4_quantize,
    int8_quantize,
    prepare,
)
from ltjax._progress import Progress, leaf_nbytes

DP_UNITS_PER_LEAF = 1000  # byte-unit resolution: a leaf's rounding wastes < 1/1000 of the smallest plan per leaf
DP_MAX_CELLS = 200_000_000  # leaves x units of the DP table; coarser units beyond this


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to store one leaf: its exact bytes and its measured damage (squared relative error)."""

    codec: str  # "dense" (the leaf as it is), "int8", "bitmask", "bitmask_int8" or "int4"
    nbytes: int
    error: float
    group: int = 0
    asymmetric: bool = False
    calibrated: bool = False  # GPTQ codes (int4) / output error measured on calibration statistics

    @property
    def label(self) -> str:
        if self.codec != "int4":
            return self.codec
        return f"int4 g{self.group} {'asym' if self.asymmetric else 'sym'}" + (" gptq" if self.calibrated else "")


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """A planned leaf: its options, the one chosen and why."""

    path: str
    shape: tuple[int, ...]  # as stored (a DenseGeneral / Einsum kernel: its [K, N] matmul kernel)
    dtype: str
    layers: int  # > 0: a stack of this many layers (nn.scan), one option for all
    options: tuple[Option, ...]
    chosen: int
    reason: str = ""

    @property
    def option(self) -> Option:
        return self.options[self.chosen]

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def bits(self) -> float:
        return self.option.nbytes * 8 / self.elements


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-leaf codec choices under a byte budget (`plan`); `compress_tree` / `compress_params` apply it.

    ``nbytes``: the planned leaves' bytes; ``fixed_nbytes``: the leaves the policy leaves as
    they are; ``budget_nbytes``: what the planned leaves were allowed.
    """

    entries: tuple[PlanEntry, ...]
    fixed_nbytes: int
    budget_nbytes: int
    policy: Any
    calibration: Mapping[str, InputStats] | None = None

    def entry(self, path: str) -> PlanEntry | None:
        return self._by_path.get(path)

    def replan(self, *, budget_bytes: int | None = None, bits_per_weight: float | None = None) -> Plan:
        """The same leaves and measured options under another budget (nothing is measured again)."""
        budget, what = _budget(budget_bytes, bits_per_weight, self.elements, self.fixed_nbytes)
        entries = [(e.path, e.shape, e.dtype, e.layers, list(e.options)) for e in self.entries]
        return dataclasses.replace(self, entries=tuple(choose(entries, budget, self.fixed_nbytes, what)),
                                   budget_nbytes=budget)

    @property
    def _by_path(self) -> dict[str, PlanEntry]:
        d = self.__dict__.get("_paths")
        if d is None:
            d = {e.path: e for e in self.entries}
            object.__setattr__(self, "_paths", d)
        return d

    @property
    def nbytes(self) -> int:
        return sum(e.option.nbytes for e in self.entries)

    @property
    def total_nbytes(self) -> int:
        return self.nbytes + self.fixed_nbytes

    @property
    def elements(self) -> int:
        return sum(e.elements for e in self.entries)

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / self.elements if self.elements else 0.0

    @property
    def damage(self) -> float:
        return sum(e.option.error for e in self.entries)

    def __str__(self) -> str:
        from ltjax._analyze import _fmt_bytes, _table

        rows = [[e.path, "x".join(map(str, e.shape)) + (f" ({e.layers} layers)" if e.layers else ""),
                 e.option.label, f"{e.bits:.3f}", _fmt_bytes(e.option.nbytes), f"{math.sqrt(e.option.error):.2e}",
                 e.reason] for e in self.entries]
        rows.append(["TOTAL planned", "", "", f"{self.bits_per_weight:.3f}", _fmt_bytes(self.nbytes),
                     f"{math.sqrt(self.damage):.2e}",
                     f"budget {_fmt_bytes(self.budget_nbytes)} ({self.budget_nbytes * 8 / max(self.elements, 1):.3f} "
                     f"bits/weight); fixed leaves {_fmt_bytes(self.fixed_nbytes)}"])
        return _table(["leaf", "shape", "choice", "bits/w", "stored", "rel err", "why"], rows)

    def to_json(self) -> str:
        return json.dumps({
            "nbytes": self.nbytes, "fixed_nbytes": self.fixed_nbytes, "budget_nbytes": self.budget_nbytes,
            "bits_per_weight": self.bits_per_weight, "damage": self.damage,
            "entries": [{"path": e.path, "shape": list(e.shape), "dtype": e.dtype, "layers": e.layers,
                         "choice": dataclasses.asdict(e.option), "label": e.option.label, "bits": e.bits,
                         "reason": e.reason, "options": [dataclasses.asdict(o) for o in e.options]}
                        for e in self.entries]})


# ---------------------------------------------------------------------- options of one leaf
def _int4_header(a: np.ndarray, ax: int, tile, group: int, asymmetric: bool) -> Header:
    return Header(codec="int4", shape=tuple(a.shape), dtype=_dtype_name(a.dtype), axis=ax, tile=tile, group=group,
                  asymmetric=asymmetric)


def _decode_int4(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, group: int) -> np.ndarray:
    c = codes.shape[0]
    q = np.empty((c, codes.shape[1] * 2), np.float32)
    q[:, 0::2], q[:, 1::2] = codes & 15, codes >> 4
    q = q.reshape(c, -1, group)
    s = scales.astype(np.float32)[..., None]
    x = q * s + mins.astype(np.float32)[..., None] if mins is not None else (q - 8.0) * s
    return x.reshape(c, -1)


def leaf_options(stored: Any, *, name: str, axis, tile, codecs: Sequence[str], groups: Sequence[int],
                 asymmetric: Sequence[bool], stats: InputStats | None, act_order: bool = False,
                 stackable_only: bool = False) -> list[Option]:
    """Every allowed option of one (2-D or N-D, as stored) leaf, measured. ``stats``: its
    calibration (used where the channel axis is last, so the storage rows run along K)."""
    from ltjax._analyze import _nbytes

    a, ax, x2, tile_rc = prepare(stored, name=name, axis=axis, tile=tile)
    if stats is not None and (ax != a.ndim - 1 or stats.k != x2.shape[1]):
        raise ValueError(f"{name}: calibration has K={stats.k}, but the leaf's storage rows (shape={a.shape}, "
                         f"axis={ax}) are not its reduction axis of that length")
    cal = stats is not None
    dtname = _dtype_name(a.dtype)
    err = lambda dec: output_error(x2, dec, stats)
    out = []
    if "raw" in codecs:
        out.append(Option("dense", int(a.nbytes), 0.0))
    need_int8 = any(c in codecs for c in ("int8", "bitmask_int8"))
    if need_int8:
        codes, scales = int8_quantize(x2)
        e8 = err((codes.astype(np.float32) * scales[:, None]).astype(a.dtype))
    nnz = None
    for codec in ("int8", "bitmask", "bitmask_int8"):
        if codec not in codecs or (stackable_only and codec != "int8"):
            continue
        if codec != "int8" and nnz is None:
            nnz = int(_nonzero_bits(x2).sum())
        nb = _nbytes(Header(codec=codec, shape=tuple(a.shape), dtype=dtname, axis=ax, tile=tile_rc), nnz or 0)
        if codec != "int8" and nb >= a.nbytes:
            continue
        out.append(Option(codec, nb, 0.0 if codec == "bitmask" else e8, calibrated=cal))
    if "int4" in codecs and ax is not None:
        for g in groups:
            if group_reason(x2.shape, tile_rc, g) is not None:
                continue
            for asym in asymmetric:
                try:
                    arrays = (gptq_int4(x2, stats, g, asym, name=name, act_order=act_order) if cal
                              else int4_quantize(x2, g, asym))
                except ValueError:  # a group scale float16 cannot hold
                    continue
                dec = _decode_int4(*arrays, g).astype(a.dtype)
                nb = _nbytes(_int4_header(a, ax, tile_rc, g, asym), 0)
                out.append(Option("int4", nb, err(dec), g, asym, cal))
    return out


def _stack_options(layers: list[list[Option]]) -> list[Option]:
    """Options of a stack: those every layer has, bytes and damage summed."""
    key = lambda o: (o.codec, o.group, o.asymmetric)
    common = [o for o in layers[0] if all(any(key(p) == key(o) for p in l) for l in layers[1:])]
    out = []
    for o in common:
        same = [next(p for p in l if key(p) == key(o)) for l in layers]
        out.append(dataclasses.replace(o, nbytes=sum(p.nbytes for p in same), error=sum(p.error for p in same)))
    return out


# ---------------------------------------------------------------------- the choice
def _frontier(options: list[Option]) -> list[int]:
    """Indices of the options no other beats (fewer or equal bytes and less or equal damage), by bytes."""
    order = sorted(range(len(options)), key=lambda i: (options[i].nbytes, options[i].error))
    keep, best = [], math.inf
    for i in order:
        if options[i].error < best:
            keep.append(i)
            best = options[i].error
    return keep


def solve(costs: list[list[int]], errors: list[list[float]], budget: int) -> list[int] | None:
    """Minimum summed error with summed cost <= budget, one option per item (None: infeasible).

    Exact over the integer costs: ``best[b]`` is the least error of the items so far within ``b``.
    """
    lo = [min(c) for c in costs]
    cap = budget - sum(lo)
    if cap < 0:
        return None
    cap = min(cap, sum(max(c) - l for c, l in zip(costs, lo)))
    best = np.zeros(cap + 1)
    picks = np.zeros((len(costs), cap + 1), np.int16)
    for i, (c, e) in enumerate(zip(costs, errors)):
        new = np.full(cap + 1, np.inf)
        for j, (cj, ej) in enumerate(zip(c, e)):
            d = cj - lo[i]
            if d > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[d:] = best[: cap + 1 - d] + ej
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        best = new
    b = int(np.argmin(best))  # the least damage (ties: the fewest units)
    out = [0] * len(costs)
    for i in range(len(costs) - 1, -1, -1):
        j = int(picks[i, b])
        out[i] = j
        b -= costs[i][j] - lo[i]
    return out


def _reason(options: list[Option], chosen: int) -> str:
    o = options[chosen]
    if o.error == 0.0 and o.nbytes == min(p.nbytes for p in options):
        return "lossless and the smallest"
    cheaper = [p for p in options if p.nbytes < o.nbytes]
    better = [p for p in options if p.error < o.error]
    parts = []
    if not cheaper:
        parts.append("the smallest option")
    else:
        c = min(cheaper, key=lambda p: p.error)
        parts.append(f"vs {c.label}: err {math.sqrt(c.error):.1e}, {(o.nbytes - c.nbytes) / 1024:+.1f} KiB spent")
    if better:
        b = min(better, key=lambda p: p.nbytes)
        parts.append(f"{b.label} (err {math.sqrt(b.error):.1e}) would need {(b.nbytes - o.nbytes) / 1024:+.1f} KiB")
    return "; ".join(parts)


def choose(entries: list[tuple[str, tuple[int, ...], str, int, list[Option]]], budget: int,
           fixed_nbytes: int, what: str) -> list[PlanEntry]:
    """Picks one option per entry (path, stored shape, dtype, layers, options) within ``budget`` bytes."""
    lo_bytes = sum(min(o.nbytes for o in opts) for *_, opts in entries)
    elements = sum(math.prod(shape) for _, shape, *_ in entries)
    if budget < lo_bytes:
        raise ValueError(
            f"{what} cannot be met: the smallest assignment of the {len(entries)} planned leaves is {lo_bytes} "
            f"bytes ({lo_bytes * 8 / max(elements, 1):.3f} bits/weight), the whole tree {lo_bytes + fixed_nbytes} "
            f"bytes with the {fixed_nbytes} bytes the policy leaves as they are")
    fronts = [_frontier(opts) for *_, opts in entries]
    n = len(entries)
    unit = max(1, lo_bytes // (DP_UNITS_PER_LEAF * max(n, 1)))
    span = sum(max(entries[i][4][j].nbytes for j in f) - min(entries[i][4][j].nbytes for j in f)
               for i, f in enumerate(fronts))
    while n * min(span, budget - lo_bytes) // unit > DP_MAX_CELLS:
        unit *= 2
    # costs relative to each leaf's smallest option (rounded up), so the smallest assignment is always feasible
    costs, errors = [], []
    for i, f in enumerate(fronts):
        lo = min(entries[i][4][j].nbytes for j in f)
        costs.append([-(-(entries[i][4][j].nbytes - lo) // unit) for j in f])
        errors.append([entries[i][4][j].error for j in f])
    picks = solve(costs, errors, (budget - lo_bytes) // unit)
    assert picks is not None
    out = []
    for (path, shape, dtype, layers, opts), f, p in zip(entries, fronts, picks):
        out.append(PlanEntry(path, tuple(shape), dtype, layers, tuple(opts), f[p], _reason(opts, f[p])))
    return out


def _budget(budget_bytes, bits_per_weight, elements: int, fixed: int) -> tuple[int, str]:
    """(bytes the planned leaves may take, the budget as the user gave it)."""
    if (budget_bytes is None) == (bits_per_weight is None):
        raise ValueError("plan: give exactly one of budget_bytes= and bits_per_weight=")
    for what, v in (("budget_bytes", budget_bytes), ("bits_per_weight", bits_per_weight)):
        if v is not None and not (isinstance(v, (int, float, np.integer, np.floating)) and v > 0):
            raise ValueError(f"plan: {what}={v!r} must be a positive number")
    if budget_bytes is not None:
        return int(budget_bytes) - fixed, f"budget_bytes={int(budget_bytes)}"
    return int(math.floor(bits_per_weight * elements / 8)), f"bits_per_weight={bits_per_weight}"


# ---------------------------------------------------------------------- the public planner
def plan(
    tree: Any,
    *,
    budget_bytes: int | None = None,
    bits_per_weight: float | None = None,
    policy: Any = None,
    calibration: Mapping[str, InputStats] | None = None,
    groups: Sequence[int] | None = None,
    asymmetric: Sequence[bool] = (False, True),
    model: Any = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> Plan:
    """Chooses each leaf's codec so ``tree`` fits a budget with the least measured damage.

    Args:
      tree: a param tree (or any pytree of arrays).
      budget_bytes: the whole tree's bytes at most (leaves the policy does not select count
        as they are), or
      bits_per_weight: the selected leaves' average bits per weight at most (codes, scales,
        mins and checksums counted).
      policy: which leaves to plan (`ltjax.Policy`: skip, min_size, min_ndim, axes, tile) and
        which codecs they may take (``codecs``; ``"raw"`` in it lets a leaf stay dense;
        ``codec`` other than ``"auto"``: that codec, or dense). Default ``Policy()``.
      calibration: ``{path: ltjax.InputStats}`` (`ltjax.nn.calibration_stats`): damage is the
        output error on those inputs and int4 options are GPTQ's; leaves without statistics
        are judged by their weight error.
      groups, asymmetric: the int4 variants to consider (default: the policy's group if set,
        else 32, 64 and 128; symmetric and asymmetric).
      model, args, kwargs: a linen model, as `ltjax.nn.compress_params` takes it: kernels are
        planned in the layout that function stores them in.
      progress: a bar over the leaves being measured (`ltjax.compress_tree`'s rule).

    Returns:
      a `Plan` (prints as a table; ``to_json``); apply it with ``ltjax.compress_tree(tree,
      plan)`` or ``ltjax.nn.compress_params(params, plan, model=...)``.
    """
    from ltjax._analyze import tree_leaves_with_paths

    if model is not None:
        from ltjax.nn import stored_leaves

        flat, hits = stored_leaves(tree, model=model, args=args, kwargs=kwargs)
    else:
        from ltjax._layout import bias_layouts, in_layout

        flat = tree_leaves_with_paths(tree)
        layouts = bias_layouts(flat)
        flat, hits = [(p, in_layout(l, layouts.get(p))) for p, l in flat], set()
    return plan_leaves(flat, hits, budget_bytes=budget_bytes, bits_per_weight=bits_per_weight, policy=policy,
                       calibration=calibration, groups=groups, asymmetric=asymmetric, progress=progress)


def plan_leaves(flat: list[tuple[str, Any]], hits: set[str], *, budget_bytes, bits_per_weight, policy, calibration,
                groups=None, asymmetric=(False, True), progress=None) -> Plan:
    """`plan` over ``(path, leaf as stored)`` pairs, ``hits`` naming the stacked ones."""
    from ltjax._analyze import Policy, selection_reason

    policy = Policy() if policy is None else policy
    _budget(budget_bytes, bits_per_weight, 0, 0)  # checked before anything is measured
    calibration = dict(calibration or {})
    unknown = sorted(set(calibration) - {p for p, _ in flat})
    if unknown:
        raise ValueError(f"calibration has statistics for paths not in the tree: {unknown[:5]}; "
                         f"leaf paths are like {flat[0][0]!r}")
    codecs = policy.codecs if policy.codec == "auto" else (policy.codec, "raw")
    groups = tuple(groups) if groups is not None else ((policy.group,) if policy.group else INT4_GROUPS)
    entries, fixed = [], 0
    selected = []
    for path, leaf in flat:
        layer0 = np.asarray(leaf)[0] if path in hits and not isinstance(leaf, CompressedTensor) else leaf
        why = selection_reason(path, layer0, policy, set())
        if why or (path in hits and np.ndim(leaf) < 1):
            fixed += leaf_nbytes(leaf)
        else:
            selected.append((path, leaf))
    with Progress("ltjax.plan", sum(leaf_nbytes(l) for _, l in selected), len(selected), progress) as bar:
        for path, leaf in selected:
            bar.at(path)
            a = np.asarray(leaf)
            stats = calibration.get(path)
            kw = dict(axis=policy.axis_for(path), tile=policy.tile, codecs=codecs, groups=groups,
                      asymmetric=tuple(asymmetric), act_order=policy.act_order)
            if path in hits:
                opts = _stack_options([leaf_options(a[i], name=f"{path}[{i}]", stackable_only=True,
                                                    stats=None if stats is None else stats.layer(i), **kw)
                                       for i in range(a.shape[0])])
                shape, layers = a.shape, a.shape[0]
            else:
                opts, shape, layers = leaf_options(a, name=path, stats=stats, **kw), a.shape, 0
            if not opts:
                fixed += leaf_nbytes(leaf)
            else:
                entries.append((path, tuple(shape), str(a.dtype), layers, opts))
            bar.step(leaf_nbytes(leaf))
    budget, what = _budget(budget_bytes, bits_per_weight, sum(math.prod(e[1]) for e in entries), fixed)
    chosen = choose(entries, budget, fixed, what)
    return Plan(tuple(chosen), fixed, budget, policy, calibration or None)
