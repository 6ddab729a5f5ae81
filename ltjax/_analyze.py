"""The pattern analyzer, `compress`, and whole-tree compression under a `Policy`."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from ltjax._calibrate import InputStats, as_stats, gptq_int4, output_error
from ltjax._format import (
    CODECS,
    DEFAULT_INT4_GROUP,
    DTYPES,
    LOSSLESS_CODECS,
    CompressedTensor,
    Header,
    _dtype_name,
    _nonzero_bits,
    decode_storage,
    expected_arrays,
    group_reason,
    int4_dequantize,
    int4_quantize,
    int8_quantize,
    pack,
    prepare,
    to_storage,
)
from ltjax._layout import Layout, bias_layouts, in_layout
from ltjax._progress import Progress, leaf_nbytes

log = logging.getLogger("ltjax")

OUTLIER_SIGMAS = 6.0


# ---------------------------------------------------------------------- per-tensor analysis
@dataclasses.dataclass(frozen=True)
class CodecEstimate:
    """What one codec would cost and lose on one tensor (bytes are exact, not estimated)."""

    codec: str
    nbytes: int
    ratio: float
    rel_error: float  # ‖dense − decoded‖ / ‖dense‖ (0 for an exact round trip)


@dataclasses.dataclass(frozen=True)
class TensorStats:
    """Measured statistics of one tensor and the cost of each codec on it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    dense_nbytes: int
    zeros: float  # fraction of elements whose bits are all zero
    min: float
    max: float
    absmax: float
    rms: float
    outliers: float  # fraction of |x| > OUTLIER_SIGMAS * rms
    codecs: tuple[CodecEstimate, ...]

    def estimate(self, codec: str) -> CodecEstimate:
        return next(c for c in self.codecs if c.codec == codec)

    def best(self, error_budget: float | None = None, codecs: Iterable[str] = CODECS) -> CodecEstimate:
        """The smallest allowed codec within the budget (``None``: 0, lossless); `raw` when none
        saves space (`why_raw` says why)."""
        budget = 0.0 if error_budget is None else float(error_budget)
        codecs = _codec_tuple(codecs, "codecs")
        ok = [c for c in self.codecs if c.codec in codecs and c.rel_error <= budget]
        ok = [c for c in ok if c.nbytes < self.dense_nbytes]
        if not ok:
            return self.estimate("raw")
        return min(ok, key=lambda c: (c.nbytes, CODECS.index(c.codec)))

    def why_raw(self, error_budget: float | None = None, codecs: Iterable[str] = CODECS) -> str:
        """Why `best` (same arguments) keeps this tensor ``raw``; ``""`` when it does not."""
        if self.best(error_budget, codecs).codec != "raw":
            return ""
        codecs = _codec_tuple(codecs, "codecs")
        allowed = [c for c in self.codecs if c.codec in codecs and c.codec != "raw"]
        if not allowed:
            return f"codecs={codecs} allow no compressing codec"
        saving = [c for c in allowed if c.nbytes < self.dense_nbytes]
        if not saving:
            return "no allowed codec saves space (" + ", ".join(f"{c.codec} {c.ratio:.2f}x" for c in allowed) + ")"
        # some codec saves space, so the budget excluded every one that does: name the smallest
        c = min(saving, key=lambda c: (c.nbytes, CODECS.index(c.codec)))
        budget = "0 (lossless by default)" if error_budget is None else f"{float(error_budget):g}"
        return (
            f"{c.codec} would save {c.ratio:.2f}x at rel err {c.rel_error:.1e} > error_budget {budget}: "
            f"set error_budget= or codec={c.codec!r}"
        )

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d


def _rel_error(x: np.ndarray, decoded: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    num = float(np.linalg.norm(decoded.astype(np.float64) - x64))
    den = float(np.linalg.norm(x64))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _nbytes(header: Header, nnz: int) -> int:
    return int(sum(math.prod(s) * dt.itemsize for s, dt in expected_arrays(header, nnz).values()))


def _int4_estimate(a: np.ndarray, ax, x2: np.ndarray, tile_rc, group: int | None, asymmetric: bool) -> CodecEstimate:
    group = DEFAULT_INT4_GROUP if group is None else group
    if group_reason(x2.shape, tile_rc, group) is not None:
        return CodecEstimate("int4", int(a.nbytes), 1.0, math.inf)
    h = Header(codec="int4", shape=tuple(a.shape), dtype=_dtype_name(a.dtype), axis=ax, tile=tile_rc,
               group=group, asymmetric=asymmetric)
    nb = _nbytes(h, 0)
    try:
        codes, scales, mins = int4_quantize(x2, group, asymmetric)
    except ValueError:  # a scale float16 cannot hold
        return CodecEstimate("int4", nb, a.nbytes / nb, math.inf)
    dec = np.asarray(int4_dequantize(h, codes, scales, mins)).astype(a.dtype)
    return CodecEstimate("int4", nb, a.nbytes / nb, _rel_error(x2, dec))


def analyze_array(
    x: Any,
    *,
    name: str = "tensor",
    tile: int | tuple[int, int] | None = None,
    axis: int | None | str = "default",
    group: int | None = None,
    asymmetric: bool = False,
) -> TensorStats:
    """Measures one tensor: zeros, range, outliers, and every codec's exact size and error
    (int4 with scale groups of ``group`` columns, default `ltjax._format.DEFAULT_INT4_GROUP`;
    a tensor whose rows the groups do not divide gets int4's error as infinite)."""
    a, ax, x2, tile_rc = prepare(x, name=name, axis=axis, tile=tile)
    xf = x2.astype(np.float32)
    nz = _nonzero_bits(x2)
    nnz = int(nz.sum())
    rms = float(np.sqrt(np.mean(np.square(xf, dtype=np.float64))))
    codes, scales = int8_quantize(x2)
    dec_int8 = (codes.astype(np.float32) * scales[:, None]).astype(a.dtype)
    err_int8 = _rel_error(x2, dec_int8)
    estimates = []
    for codec in CODECS:
        if codec == "int4":
            estimates.append(_int4_estimate(a, ax, x2, tile_rc, group, asymmetric))
            continue
        h = Header(codec=codec, shape=tuple(a.shape), dtype=_dtype_name(a.dtype), axis=ax, tile=tile_rc)
        nb = _nbytes(h, nnz)
        err = 0.0 if codec in LOSSLESS_CODECS else err_int8
        estimates.append(CodecEstimate(codec, nb, a.nbytes / nb, err))
    return TensorStats(
        name=name,
        shape=tuple(int(s) for s in a.shape),
        dtype=_dtype_name(a.dtype),
        dense_nbytes=int(a.nbytes),
        zeros=1.0 - nnz / a.size,
        min=float(xf.min()),
        max=float(xf.max()),
        absmax=float(np.abs(xf).max()),
        rms=rms,
        outliers=float(np.mean(np.abs(xf) > OUTLIER_SIGMAS * rms)) if rms > 0 else 0.0,
        codecs=tuple(estimates),
    )


@dataclasses.dataclass(frozen=True)
class AnalysisReport:
    """Per-tensor statistics; prints as a table, serialises with `to_json`."""

    tensors: tuple[TensorStats, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason)
    error_budget: float | None = None

    def __str__(self) -> str:
        head = ["tensor", "shape", "dtype", "zeros", "absmax", "outl", *[f"{c} x / err" for c in CODECS], "pick"]
        rows = []
        for t in self.tensors:
            cells = [
                t.name,
                "x".join(map(str, t.shape)),
                t.dtype,
                f"{t.zeros:.1%}",
                f"{t.absmax:.3g}",
                f"{t.outliers:.1e}",
            ]
            cells += [f"{e.ratio:.2f} / {e.rel_error:.1e}" for e in t.codecs]
            cells.append(t.best(self.error_budget).codec)
            rows.append(cells)
        out = _table(head, rows)
        for path, why in self.skipped:
            out += f"\nskipped {path}: {why}"
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "error_budget": self.error_budget,
                "tensors": [t.to_json() for t in self.tensors],
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            }
        )


def analyze(tree: Any, *, error_budget: float | None = None, tile=None, progress: bool | None = None) -> AnalysisReport:
    """Analyzes an array or every float leaf of a pytree (e.g. Flax params).

    ``progress``: a bar on stderr over the leaves (bytes, current path): ``None`` (default)
    only on a terminal and for more than a few leaves or MiB, ``True`` always, ``False`` never.
    """
    if _is_array(tree):
        return AnalysisReport((analyze_array(tree, tile=tile),), error_budget=error_budget)
    stats, skipped = [], []
    flat = tree_leaves_with_paths(tree)
    with Progress("ltjax.analyze", sum(leaf_nbytes(l) for _, l in flat), len(flat), progress) as bar:
        for path, leaf in flat:
            bar.at(path)
            if isinstance(leaf, CompressedTensor):
                skipped.append((path, f"already compressed ({leaf.codec})"))
            elif why := _unsupported(leaf):
                skipped.append((path, why))
            else:
                stats.append(analyze_array(leaf, name=path, tile=tile))
            bar.step(leaf_nbytes(leaf))
    return AnalysisReport(tuple(stats), tuple(skipped), error_budget)


# ---------------------------------------------------------------------- compress
def compress(
    x: Any,
    codec: str = "auto",
    *,
    error_budget: float | None = None,
    tile: int | tuple[int, int] | None = None,
    axis: int | None | str = "default",
    codecs: Iterable[str] = CODECS,
    name: str = "tensor",
    group: int | None = None,
    asymmetric: bool = False,
    calibration: Any = None,
    act_order: bool = False,
) -> CompressedTensor:
    """Packs ``x`` (host side) into the LT-Block format.

    Args:
      x: a float32 / bfloat16 / float16 array (numpy or jax), any shape.
      codec: one of `ltjax.CODECS`, or ``"auto"``: the smallest of ``codecs`` whose relative
        error ‖x − decoded‖/‖x‖ is within ``error_budget``, and ``raw`` when nothing saves space.
      error_budget: the relative error ``auto`` may spend; ignored for an explicit codec.
        ``None``: lossless only (0), unless every codec in ``codecs`` other than ``raw`` is
        lossy (e.g. ``codecs=("int8",)``): naming only lossy codecs means "use them", so
        ``auto`` then chooses among them with no error limit.
      tile: tile geometry: elements per tile (default 65536) or ``(rows, cols)`` of the
        storage matrix.
      axis: the channel axis (one int8 scale per channel); default: the last axis of an N-D
        tensor (a flax Dense kernel's output axis), one channel for 0-D and 1-D tensors.
      codecs: the codecs ``auto`` may choose from (one name or a sequence of names).
      name: used in error messages.
      group, asymmetric: int4's scale groups: columns of the storage row (the reduction axis
        of a Dense kernel) per scale, 32, 64 (default) or 128; ``asymmetric`` adds a min per
        group (docs/int4.md).
      calibration: int4 only: the layer's inputs ``X [tokens, K]`` (numpy or jax; or their
        `ltjax.InputStats`), ``K`` being the reduction axis (a Dense kernel ``[K, N]``'s first):
        the codes come from GPTQ error feedback (`ltjax._calibrate`), which minimises the
        output error ``||X (W - Q)||`` instead of each weight's; same format, same decoders.
      act_order: with ``calibration``: quantize the columns by decreasing input energy (the
        group scales are then fitted up front).

    >>> import numpy as np, ltjax
    >>> ct = ltjax.compress(np.eye(64, dtype=np.float32))   # 98% zeros: lossless bitmask
    >>> ct.codec, ct.shape
    ('bitmask', (64, 64))
    """
    if calibration is not None and codec != "int4":
        raise ValueError(f"calibration= applies to codec 'int4' (GPTQ), not {codec!r}")
    if codec == "auto":
        codecs = _codec_tuple(codecs, "codecs")
        error_budget = _budget(error_budget, codecs, "error_budget")
        stats = analyze_array(x, name=name, tile=tile, axis=axis, group=group, asymmetric=asymmetric)
        codec = stats.best(error_budget, codecs).codec
    elif codec not in CODECS:
        raise ValueError(f"{codec=} is not a codec; choose 'auto' or one of {CODECS}")
    if codec != "int4":
        return pack(x, codec, tile=tile, axis=axis, name=name)
    int4 = None
    if calibration is not None:
        int4 = calibrated_int4(x, axis, as_stats(calibration, name=name), group, asymmetric, name=name,
                               act_order=act_order)
    return pack(x, codec, tile=tile, axis=axis, name=name, group=group, asymmetric=asymmetric, int4=int4)


def calibrated_int4(x: Any, axis: int | None | str, stats: InputStats, group: int | None, asymmetric: bool, *,
                    name: str, act_order: bool = False):
    """GPTQ int4 arrays of ``x`` (`ltjax._calibrate.gptq_int4`) for `pack(..., int4=...)`; the
    storage rows must run along the reduction axis (the channel axis is the last one)."""
    a, ax, x2, _ = prepare(x, name=name, axis=axis, tile=None)
    if ax is None or ax != a.ndim - 1:
        raise ValueError(f"tensor {name!r}: calibration needs the channel axis last (a Dense kernel [K, N], "
                         f"storage [N, K]); got axis={ax} for shape={a.shape}")
    group = DEFAULT_INT4_GROUP if group is None else int(group)
    return gptq_int4(x2, stats, group, asymmetric, name=name, act_order=act_order)


# ---------------------------------------------------------------------- trees
@dataclasses.dataclass(frozen=True)
class Policy:
    """Which leaves of a tree to compress, and how.

    Attributes:
      codec: ``"auto"`` or one codec for every selected leaf.
      codecs: the codecs ``auto`` may choose from (one name or a sequence of names).
      error_budget: relative error ``auto`` may spend per tensor. ``None``: lossless (0), unless
        every codec in ``codecs`` other than ``raw`` is lossy (e.g. ``codecs=("int8",)``):
        naming only lossy codecs means "use them", so the policy then holds
        ``error_budget=math.inf`` and ``auto`` chooses among them with no error limit.
      min_size: leaves with fewer elements stay dense.
      min_ndim: leaves of lower rank stay dense (biases, norm scales).
      skip: glob patterns on the ``a/b/kernel`` path of leaves to keep dense.
      axes: ``(pattern, axis)`` pairs overriding the channel axis (first match wins), e.g.
        ``(("*embedding", 0),)`` so an embedding's rows are its channels.
      tile: tile geometry for every tensor.
      group, asymmetric: int4's scale groups (`ltjax.compress`); a leaf whose reduction axis
        the group does not divide stays dense under ``codec="int4"``, with the reason.
      act_order: GPTQ's column order where calibration is given (`ltjax.compress`).
      max_bytes, bits: a budget (`ltjax.plan`): the whole tree in at most ``max_bytes`` bytes, or
        the leaves this policy selects at ``bits`` bits per weight on average (scales and all
        format overhead counted); each selected leaf's codec (dense, int8, int4 at a group, the
        bitmask codecs where ``codecs`` allow) is then chosen for the least measured damage.
    """

    codec: str = "auto"
    codecs: tuple[str, ...] = CODECS
    error_budget: float | None = None
    min_size: int = 4096
    min_ndim: int = 2
    skip: tuple[str, ...] = ()
    axes: tuple[tuple[str, int | None], ...] = (("*embedding", 0),)
    tile: int | tuple[int, int] | None = None
    group: int | None = None
    asymmetric: bool = False
    act_order: bool = False
    max_bytes: int | None = None
    bits: float | None = None

    def __post_init__(self):
        if self.codec != "auto" and self.codec not in CODECS:
            raise ValueError(f"Policy codec={self.codec!r} is not 'auto' or one of {CODECS}")
        if self.max_bytes is not None and self.bits is not None:
            raise ValueError(f"Policy: give max_bytes={self.max_bytes} or bits={self.bits}, not both")
        for what, v in (("max_bytes", self.max_bytes), ("bits", self.bits)):
            if v is not None and not (isinstance(v, (int, float, np.integer, np.floating)) and v > 0):
                raise ValueError(f"Policy {what}={v!r} must be a positive number")
        object.__setattr__(self, "codecs", _codec_tuple(self.codecs, "Policy codecs"))
        object.__setattr__(self, "error_budget", _budget(self.error_budget, self.codecs, "Policy error_budget"))
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))

    def axis_for(self, path: str) -> int | None | str:
        for pattern, axis in self.axes:
            if fnmatch.fnmatchcase(path, pattern):
                return axis
        return "default"


@dataclasses.dataclass(frozen=True)
class LeafReport:
    path: str
    shape: tuple[int, ...]
    dtype: str
    codec: str  # "dense" when left as is
    dense_nbytes: int
    nbytes: int
    rel_error: float | None = None
    reason: str = ""
    out_error: float | None = None  # ‖X (W − Q)‖ / ‖X W‖ on the calibration inputs, where given


@dataclasses.dataclass(frozen=True)
class CompressionReport:
    """Bytes before and after, per leaf and in total."""

    leaves: tuple[LeafReport, ...]
    unmatched_skip: tuple[str, ...] = ()

    @property
    def dense_nbytes(self) -> int:
        return sum(l.dense_nbytes for l in self.leaves)

    @property
    def nbytes(self) -> int:
        return sum(l.nbytes for l in self.leaves)

    @property
    def ratio(self) -> float:
        return self.dense_nbytes / self.nbytes if self.nbytes else float("inf")

    def __str__(self) -> str:
        calibrated = any(l.out_error is not None for l in self.leaves)  # ‖X (W − Q)‖ / ‖X W‖ where measured
        rows = [
            [
                l.path,
                "x".join(map(str, l.shape)),
                l.dtype,
                l.codec,
                _fmt_bytes(l.dense_nbytes),
                _fmt_bytes(l.nbytes),
                f"{l.dense_nbytes / l.nbytes:.2f}x" if l.nbytes else "-",
                "-" if l.rel_error is None else f"{l.rel_error:.2e}",
                *(["-" if l.out_error is None else f"{l.out_error:.2e}"] if calibrated else []),
                l.reason,
            ]
            for l in self.leaves
        ]
        rows.append(["TOTAL", "", "", "", _fmt_bytes(self.dense_nbytes), _fmt_bytes(self.nbytes), f"{self.ratio:.2f}x",
                     "", *([""] if calibrated else []), ""])
        head = ["leaf", "shape", "dtype", "codec", "dense", "stored", "ratio", "rel err",
                *(["out err"] if calibrated else []), "note"]
        out = _table(head, rows)
        if self.unmatched_skip:
            out += f"\nskip patterns that matched no leaf: {', '.join(self.unmatched_skip)}"
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "dense_nbytes": self.dense_nbytes,
                "nbytes": self.nbytes,
                "ratio": self.ratio,
                "unmatched_skip": list(self.unmatched_skip),
                "leaves": [dict(dataclasses.asdict(l), shape=list(l.shape)) for l in self.leaves],
            }
        )


def compress_tree(tree: Any, policy: Any = None, *, calibration: Any = None, return_report: bool = False,
                  progress: bool | None = None):
    """Compresses every leaf of ``tree`` that ``policy`` selects; the rest stays as it is.

    Returns the tree with `CompressedTensor` leaves (same structure), or ``(tree, report)``
    with ``return_report=True``; each leaf left dense has its reason in the report. Skip
    patterns that match no leaf are reported (and logged), never silently ignored.
    An N-D ``kernel`` beside a ``bias`` whose shape is the kernel's trailing axes (flax's
    ``DenseGeneral`` convention: the bias has the features' shape) is stored as the 2-D
    ``[prod(in), prod(features)]`` matmul kernel `ltjax.nn.intercept` runs as one
    `ltjax.matmul` (`ltjax.nn.compress_params` with ``model=`` finds every layout, bias or not).

    ``policy``: a `Policy` (default ``Policy()``; with ``max_bytes`` / ``bits``, planned by
    `ltjax.plan` first), or a `ltjax.Plan`, whose per-leaf choices are applied.
    ``calibration``: ``{path: ltjax.InputStats}`` (`ltjax.nn.calibration_stats`): int4 leaves
    with statistics are quantized by GPTQ, and the report gives each such leaf's output error.
    ``progress``: a bar on stderr over the leaves (bytes, current path): ``None`` (default)
    only on a terminal and for more than a few leaves or MiB, ``True`` always, ``False`` never.
    """
    policy, calibration, plan = resolve_plan(tree, policy, calibration, progress)
    out, report = compress_planned(tree, policy, calibration, plan, progress)
    return (out, report) if return_report else out


def compress_planned(tree: Any, policy: Policy, calibration: dict, plan: Any, progress: bool | None):
    """`compress_tree` once the plan is resolved: ``(tree, report)``."""
    paths_leaves = tree_leaves_with_paths(tree)
    layouts = bias_layouts(paths_leaves)
    _check_calibration_paths(calibration, paths_leaves)
    total = sum(leaf_nbytes(l) for _, l in paths_leaves)
    with Progress("ltjax.compress_tree", total, len(paths_leaves), progress) as bar:
        new_leaves, reports, used = [], [], set()
        for path, leaf in paths_leaves:
            bar.at(path)
            leaf_out, rep = _compress_leaf(path, leaf, policy, used, layouts.get(path), calibration.get(path), plan)
            new_leaves.append(leaf_out)
            reports.append(rep)
            bar.step(leaf_nbytes(leaf))
    unmatched = tuple(p for p in policy.skip if p not in used)
    if unmatched:
        log.warning("ltjax.compress_tree: skip patterns matched no leaf: %s", ", ".join(unmatched))
    treedef = jax.tree_util.tree_structure(tree, is_leaf=_is_ct)
    out = jax.tree_util.tree_unflatten(treedef, new_leaves)
    return out, CompressionReport(tuple(reports), unmatched)


def resolve_plan(tree: Any, policy: Any, calibration: Any, progress, flat_hits=None):
    """``(policy, calibration dict, plan or None)``: a `Plan` as given, a budgeted `Policy` planned
    here (`ltjax.plan`; over ``flat_hits``, the stored leaves and the stacked paths, where given),
    a plain `Policy` with no plan."""
    from ltjax._plan import Plan, plan, plan_leaves

    if isinstance(policy, Plan):
        if calibration is None:
            calibration = policy.calibration
        return policy.policy, dict(calibration or {}), policy
    policy = Policy() if policy is None else policy
    if not isinstance(policy, Policy):
        raise ValueError(f"policy={policy!r} must be an ltjax.Policy or an ltjax.Plan")
    if policy.max_bytes is None and policy.bits is None:
        return policy, dict(calibration or {}), None
    kw = dict(budget_bytes=policy.max_bytes, bits_per_weight=policy.bits, policy=policy, calibration=calibration,
              progress=progress)
    p = plan(tree, **kw) if flat_hits is None else plan_leaves(*flat_hits, **kw)
    return policy, dict(calibration or {}), p


def _check_calibration_paths(calibration: dict, flat: list[tuple[str, Any]]) -> None:
    unknown = sorted(set(calibration) - {p for p, _ in flat})
    if unknown:
        raise ValueError(f"calibration has statistics for paths not in the tree: {unknown[:5]}; "
                         f"leaf paths are like {flat[0][0]!r}")
    bad = [p for p, v in calibration.items() if not isinstance(v, InputStats)]
    if bad:
        raise ValueError(f"calibration must map leaf paths to ltjax.InputStats; {bad[:5]} do not")


def selection_reason(path: str, leaf: Any, policy: Policy, used: set) -> str:
    """Why ``policy`` leaves ``leaf`` as it is (``""``: it is selected); adds skip hits to ``used``."""
    skip_hit = [p for p in policy.skip if fnmatch.fnmatchcase(path, p)]
    used.update(skip_hit)
    if isinstance(leaf, CompressedTensor):
        return "already compressed"
    why = _unsupported(leaf)
    shape = tuple(getattr(leaf, "shape", ()))
    if not why and skip_hit:
        why = f"skipped by pattern {skip_hit[0]!r}"
    if not why and math.prod(shape) < policy.min_size:
        why = f"size {math.prod(shape)} < min_size {policy.min_size}"
    if not why and len(shape) < policy.min_ndim:
        why = f"ndim {len(shape)} < min_ndim {policy.min_ndim}"
    return why


def _compress_leaf(path: str, leaf: Any, policy: Policy, used: set, layout: Layout | None = None,
                   stats: InputStats | None = None, plan: Any = None) -> tuple[Any, LeafReport]:
    """One leaf of `compress_tree`: (the leaf to keep, its report line); adds skip hits to ``used``.
    ``layout``: the matmul layout a compressed kernel is stored in (`ltjax._layout`); ``stats``:
    its calibration; ``plan``: a `ltjax.Plan` whose choice for this leaf is applied."""
    why = selection_reason(path, leaf, policy, used)
    if isinstance(leaf, CompressedTensor):
        return leaf, LeafReport(path, leaf.shape, leaf.header.dtype, leaf.codec, leaf.dense_nbytes, leaf.nbytes, None,
                                why)
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = str(getattr(leaf, "dtype", type(leaf).__name__))
    nb = int(getattr(leaf, "nbytes", 0) or 0)
    entry = None if plan is None or why else plan.entry(path)
    if plan is not None and not why and entry is None:
        why = "not in the plan (the plan was made for another tree or policy)"
    if why:
        return leaf, LeafReport(path, shape, dtype, "dense", nb, nb, None, why)
    axis = policy.axis_for(path)
    stored = in_layout(leaf, layout)
    note = ""
    int4 = dict(group=policy.group, asymmetric=policy.asymmetric)
    if entry is not None:
        if tuple(np.shape(stored)) != entry.shape:
            raise ValueError(f"{path}: the plan was made for a leaf of shape={entry.shape}, this one is stored as "
                             f"{tuple(np.shape(stored))}: plan with the same model= / layouts as you compress with")
        o = entry.option
        if o.codec == "dense":
            return leaf, LeafReport(path, shape, dtype, "dense", nb, nb, None, f"plan: {entry.reason}")
        codec, err, note = o.codec, None, f"plan: {entry.reason}"
        int4 = dict(group=o.group, asymmetric=o.asymmetric)
    elif policy.codec == "auto":
        stats_w = analyze_array(stored, name=path, tile=policy.tile, axis=axis, **int4)
        codec = stats_w.best(policy.error_budget, policy.codecs).codec
        err = stats_w.estimate(codec).rel_error
        if codec == "raw":  # raw saves nothing: the plain array is as small and faster
            reason = stats_w.why_raw(policy.error_budget, policy.codecs)
            return leaf, LeafReport(path, shape, dtype, "dense", nb, nb, None, reason)
    else:
        codec, err = policy.codec, None
    try:
        if codec == "int4":
            arrays = None
            if stats is not None:
                arrays = calibrated_int4(stored, axis, stats, int4["group"], int4["asymmetric"], name=path,
                                         act_order=policy.act_order)
                note = "; ".join(filter(None, [f"GPTQ on {stats.count} tokens", note]))
                err = None
            ct = pack(stored, codec, tile=policy.tile, axis=axis, name=path, int4=arrays, **int4)
        else:
            ct = pack(stored, codec, tile=policy.tile, axis=axis, name=path)
    except ValueError as e:
        if codec != "int4":
            raise
        return leaf, LeafReport(path, shape, dtype, "dense", nb, nb, None, str(e))  # e.g. groups do not divide K
    if err is None:
        err = _measured_error(stored, ct)
    return ct, LeafReport(path, shape, ct.header.dtype, codec, ct.dense_nbytes, ct.nbytes, err, note,
                          _output_error(stored, ct, stats))


def tree_report(tree: Any) -> CompressionReport:
    """Bytes of every leaf of a (possibly compressed) tree."""
    leaves = []
    for path, leaf in tree_leaves_with_paths(tree):
        if isinstance(leaf, CompressedTensor):
            leaves.append(LeafReport(path, leaf.shape, leaf.header.dtype, leaf.codec, leaf.dense_nbytes, leaf.nbytes))
        elif hasattr(leaf, "nbytes"):
            nb = int(leaf.nbytes)
            leaves.append(LeafReport(path, tuple(leaf.shape), str(leaf.dtype), "dense", nb, nb))
    return CompressionReport(tuple(leaves))


def _output_error(x: Any, ct: CompressedTensor, stats: InputStats | None) -> float | None:
    """‖X (W − Q)‖ / ‖X W‖ of what ``ct`` stores, on the calibration statistics (None without them,
    or where the storage rows are not the reduction axis they describe)."""
    if stats is None:
        return None
    h = ct.header
    if h.axis is None or h.axis != len(h.shape) - 1 or h.storage_shape[1] != stats.k:
        return None
    w2 = to_storage(np.asarray(x), h.axis)
    return math.sqrt(output_error(w2, np.asarray(decode_storage(ct), np.float32), stats))


def _measured_error(x: Any, ct: CompressedTensor) -> float:
    """‖x − decoded‖/‖x‖ of what ``ct`` stores (0 for the lossless codecs)."""
    if ct.codec in LOSSLESS_CODECS:
        return 0.0
    a = np.asarray(x)
    return _rel_error(to_storage(a, ct.header.axis), np.asarray(decode_storage(ct)))


# ---------------------------------------------------------------------- helpers
def _codec_tuple(codecs: Any, what: str) -> tuple[str, ...]:
    """``codecs`` as a tuple of known codec names (one name counts as one codec)."""
    codecs = (codecs,) if isinstance(codecs, str) else tuple(codecs)
    bad = [c for c in codecs if c not in CODECS]
    if bad:
        raise ValueError(f"{what}={codecs} has unknown codecs {bad}; choose from {CODECS}")
    return codecs


def _budget(error_budget: float | None, codecs: tuple[str, ...], what: str) -> float | None:
    """The error budget `auto` works with: ``None`` (lossless) unless only lossy codecs are named."""
    if error_budget is None:
        named = [c for c in codecs if c != "raw"]
        if named and not any(c in LOSSLESS_CODECS for c in named):
            return math.inf  # the user named only lossy codecs: use them
        return None
    try:
        ok = not isinstance(error_budget, (str, bytes)) and float(error_budget) >= 0  # NaN fails too
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{what}={error_budget!r} must be >= 0 (a relative error; None: lossless)")
    return float(error_budget)


def _is_ct(x: Any) -> bool:
    return isinstance(x, CompressedTensor)


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array))


def _unsupported(leaf: Any) -> str:
    if not _is_array(leaf):
        return f"not an array ({type(leaf).__name__})"
    if np.dtype(leaf.dtype) not in DTYPES.values():
        return f"dtype {np.dtype(leaf.dtype)} is not one of {', '.join(DTYPES)}"
    if math.prod(leaf.shape) == 0:
        return "empty"
    return ""


def path_str(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def tree_leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """(``a/b/kernel`` path, leaf) pairs; `CompressedTensor`s count as leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_ct)
    return [(path_str(p), leaf) for p, leaf in flat]


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
