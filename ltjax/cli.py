"""The ``ltjax`` command line: analyze, compress, inspect and verify tensor files; say what runs here;
run the benchmarks (from a source checkout)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ltjax._analyze import Policy, _fmt_bytes, _table, analyze, compress_tree
from ltjax._errors import LTFormatError
from ltjax._format import CODECS, CompressedTensor
from ltjax._io import HEADER_CRC_NAME, read_leaves, read_safetensors, save, verify


def _is_ltjax_file(path: str) -> bool:
    try:
        _, meta, _ = read_safetensors(path)
    except LTFormatError:
        return False
    return meta.get("format") == "ltjax"


def read_tensors(path: str) -> dict[str, Any]:
    """Tensors of a ``.npz``, safetensors or ltjax file, by name (compressed ones as `CompressedTensor`)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if _is_ltjax_file(path):
        return dict(read_leaves(path))
    arrays, _, _ = read_safetensors(path)
    arrays.pop(HEADER_CRC_NAME, None)
    return arrays


def _decoded(tensors: dict[str, Any]) -> dict[str, Any]:
    from ltjax._format import decompress_reference

    return {k: np.asarray(decompress_reference(v)) if isinstance(v, CompressedTensor) else v
            for k, v in tensors.items()}


def _cmd_analyze(args) -> int:
    report = analyze(_decoded(read_tensors(args.file)), error_budget=args.error_budget)
    print(report.to_json() if args.json else report)
    return 0


def _cmd_compress(args) -> int:
    tensors = read_tensors(args.file)
    policy = Policy(
        codec=args.codec,
        error_budget=args.error_budget,
        min_size=args.min_size,
        min_ndim=args.min_ndim,
        skip=tuple(args.skip or ()),
        max_bytes=args.max_bytes,
        bits=args.bits,
    )
    tree, report = compress_tree(_decoded(tensors), policy, return_report=True)
    save(args.output, tree)
    size = _fmt_bytes(os.path.getsize(args.output))
    print(report.to_json() if args.json else f"{report}\nwrote {args.output} ({size})")
    return 0


def _cmd_inspect(args) -> int:
    leaves = read_leaves(args.file)
    rows = []
    for path, leaf in leaves:
        if isinstance(leaf, CompressedTensor):
            h = leaf.header
            rows.append(dict(path=path, codec=h.codec, shape=list(h.shape), dtype=h.dtype, axis=h.axis,
                             tile=list(h.tile), tiles=h.num_tiles, nnz=leaf.nnz, nbytes=leaf.nbytes,
                             dense_nbytes=leaf.dense_nbytes, ratio=leaf.ratio))
        else:
            rows.append(dict(path=path, codec="dense", shape=list(leaf.shape), dtype=str(leaf.dtype), axis=None,
                             tile=None, tiles=0, nnz=None, nbytes=int(leaf.nbytes), dense_nbytes=int(leaf.nbytes),
                             ratio=1.0))
    if args.json:
        print(json.dumps({"path": args.file, "version": 1, "tensors": rows}))
        return 0
    table = [[r["path"], r["codec"], "x".join(map(str, r["shape"])), r["dtype"], str(r["axis"]),
              "-" if r["tile"] is None else "x".join(map(str, r["tile"])), str(r["tiles"]),
              _fmt_bytes(r["dense_nbytes"]), _fmt_bytes(r["nbytes"]), f"{r['ratio']:.2f}x"] for r in rows]
    dense, stored = sum(r["dense_nbytes"] for r in rows), sum(r["nbytes"] for r in rows)
    table.append(["TOTAL", "", "", "", "", "", "", _fmt_bytes(dense), _fmt_bytes(stored),
                  f"{dense / max(stored, 1):.2f}x"])
    print(_table(["tensor", "codec", "shape", "dtype", "axis", "tile", "tiles", "dense", "stored", "ratio"], table))
    return 0


def _cmd_verify(args) -> int:
    summary = verify(args.file)
    print(json.dumps(summary) if args.json else
          f"OK {args.file}: {summary['leaves']} tensors ({summary['compressed']} compressed, "
          f"{summary['tiles']} tiles) verified, {summary['file_bytes']} bytes")
    return 0


def info_report() -> dict[str, Any]:
    """What this installation will run: versions, devices, the CPU FFI extension's state and, per
    codec and batch size, the implementation `ltjax.matmul` picks (with the reason where it
    falls back), as `ltjax.explain` says."""
    import jax
    import jax.numpy as jnp

    import ltjax
    from ltjax._config import host_platform
    from ltjax.ffi import cpu as lffi, cuda as lcuda
    from ltjax.ops.matmul import IMPLEMENTATIONS

    here = host_platform()
    native = [i.name for i in IMPLEMENTATIONS if i.platforms is None or here in i.platforms]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0
    routes = {}
    for codec in ("int8", "bitmask_int8", "bitmask", "int4"):
        ct = ltjax.compress(w, codec)
        for m in (1, 16, 65, 257):  # 65, 257: past the CPU handlers' row limits (ltjax.ops.matmul.cpu)
            x = jax.ShapeDtypeStruct((m, w.shape[0]), jnp.float32)
            e = ltjax.explain(x, ct)
            ahead = native[: native.index(e.impl)] if e.impl in native else native
            routes[f"{codec} M={m}"] = {"impl": e.impl, "backward": e.backward, "platforms": e.platforms,
                                        "why_not": {n: e.reasons[n] for n in ahead}}
            if e.platforms["cuda"] == "pallas":  # which GPU kernel a CUDA program holds: Triton, or the
                from ltjax import pallas as lp  # int8 Mosaic GPU one (chosen when tracing on a Hopper GPU)

                routes[f"{codec} M={m}"]["cuda_kernel"] = lp.kernel_backend(x, ct)
    ffi = {k: v for k, v in lffi.info().items() if k != "targets"}
    package = {"path": os.path.dirname(os.path.abspath(ltjax.__file__)), "distribution": None}
    try:
        import importlib.metadata as md

        dist = md.distribution("ltjax")
        direct = json.loads(dist.read_text("direct_url.json") or "null") or {}
        package["distribution"] = {"version": dist.version, "location": str(dist.locate_file("")),
                                   "editable": bool(direct.get("dir_info", {}).get("editable")),
                                   "url": direct.get("url")}
    except Exception:  # no installed distribution (a bare source tree on PYTHONPATH): path only
        pass
    d = package["distribution"]
    # A regular install elsewhere than the imported package: a source tree (a checkout run from) shadows it.
    package["shadows_installed"] = bool(d and not d["editable"] and
                                        os.path.commonpath([package["path"], d["location"]]) != d["location"])
    path, why = lcuda.library()
    cuda = {"library": str(path) if path else None, "reason": why, "auto": lcuda.enabled()}
    return {"ltjax": ltjax.__version__, "package": package, "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "cpu_ffi": ffi, "cuda_kernels": cuda,
            "matmul_routes": routes}


def _cmd_info(args) -> int:
    r = info_report()
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"ltjax {r['ltjax']}, jax {r['jax']}, backend {r['backend']} ({len(r['devices'])} device(s): "
          f"{', '.join(r['devices'])})")
    d = r["package"]["distribution"]
    print(f"ltjax imported from {r['package']['path']}" + (
        f"; installed distribution {d['version']}" + (f", editable from {d['url']}" if d["editable"] else
                                                     f" at {d['location']}") if d else "; no installed distribution")
          + (" (not the one imported: this source tree shadows it)" if r["package"]["shadows_installed"] else ""))
    f = r["cpu_ffi"]
    if f["loaded"]:
        print(f"CPU FFI extension: loaded from {f['path']}, {f['isa']}, {f['threads']} threads; "
              f"M = 1 bitmask_int8 GEMV: {f['vnni'] or 'f32 walk'}; "
              f"int8 GEMM (M >= 2): {'AMX tiles' if f['amx'] else 'f32 kernel'}")
    else:
        print(f"CPU FFI extension: not loaded ({f['reason']})")
    c = r["cuda_kernels"]
    print(f"CUDA small-M kernels (docs/cuda.md): {'built, ' + c['library'] if c['library'] else c['reason']}; "
          f"picked by impl=None on a GPU: {'yes' if c['auto'] else 'no (LTJAX_CUDA_GEMV=1 turns it on)'}")
    print("ltjax.matmul with f32 activations runs (ltjax.explain; a program lowered for another platform "
          "holds that platform's path):")
    for name, route in r["matmul_routes"].items():
        impl = route["impl"]
        why = "; ".join(f"not {n}: {w}" for n, w in route["why_not"].items())
        gpu = route["platforms"]["cuda"] + (f" ({route['cuda_kernel']})" if "cuda_kernel" in route else "")
        print(f"  {name:18s} {impl}, {route['backward']}; lowered for CUDA: {gpu}" + (f"  ({why})" if why else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltjax", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    a = sub.add_parser("analyze", help="per-tensor statistics and the size/error of every codec")
    a.add_argument("file", help="a .safetensors, .npz or ltjax file")
    a.add_argument("--error-budget", type=float, default=None, help="relative error the 'pick' column may spend")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=_cmd_analyze)

    c = sub.add_parser("compress", help="compress every tensor of a file into an ltjax file")
    c.add_argument("file")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--codec", default="auto", choices=("auto",) + CODECS)
    c.add_argument("--error-budget", type=float, default=None)
    c.add_argument("--min-size", type=int, default=4096)
    c.add_argument("--min-ndim", type=int, default=2)
    c.add_argument("--skip", action="append", help="glob pattern of tensor names to keep dense (repeatable)")
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--max-bytes", type=int, default=None,
                        help="plan each tensor's codec (ltjax.plan) so the file's tensors take at most N bytes")
    budget.add_argument("--bits", type=float, default=None,
                        help="plan each tensor's codec so the compressed tensors average at most B bits per weight")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=_cmd_compress)

    i = sub.add_parser("inspect", help="list the tensors of an ltjax file (after verifying it)")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_inspect)

    v = sub.add_parser("verify", help="check the header and every tile checksum of an ltjax file")
    v.add_argument("file")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=_cmd_verify)

    n = sub.add_parser("info", help="versions, which ltjax was imported (from where), devices, whether the CPU FFI "
                                    "extension loaded (from where, or why not) and the path ltjax.matmul takes")
    n.add_argument("--json", action="store_true")
    n.set_defaults(fn=_cmd_info)

    b = sub.add_parser("bench", help="run the benchmark harness of the source checkout (benchmarks.run); see "
                                     "`ltjax bench --help`",
                       add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to benchmarks.run")
    b.set_defaults(fn=_cmd_bench)

    return p


def source_checkout() -> Path | None:
    """The source checkout the imported ltjax comes from (an editable install, or run from the
    tree): the folder holding ``ltjax/`` and ``benchmarks/run.py``. None for an installed wheel,
    which carries only the ``ltjax`` package."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "benchmarks" / "run.py").is_file() else None


NO_CHECKOUT = """ltjax bench: the benchmarks run from a source checkout of ltjax; the imported ltjax ({path})
is an installed package, which carries no benchmarks. Get the source (a clone of the ltjax
repository, or its source distribution unpacked), then in it:
    pip install -e ".[bench]"
    ltjax bench            # or: python -m benchmarks.run"""


def _cmd_bench(args) -> int:
    root = source_checkout()
    if root is None:
        print(NO_CHECKOUT.format(path=Path(__file__).resolve().parent), file=sys.stderr)
        return 2
    if str(root) not in sys.path:  # the checkout's `benchmarks`, not another project's of that name
        sys.path.insert(0, str(root))
    import benchmarks  # lazy: matplotlib and the benchmarks load only here

    if Path(benchmarks.__file__).resolve().parent != root / "benchmarks":
        print(f"ltjax bench: `benchmarks` imports from {Path(benchmarks.__file__).parent}, not from the checkout "
              f"{root}: another package of that name is installed or was imported first", file=sys.stderr)
        return 2
    from benchmarks.run import main as bench_main

    return bench_main(args.bench_args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every option after `bench` belongs to the harness, --help included
        return _cmd_bench(argparse.Namespace(bench_args=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (LTFormatError, ValueError, FileNotFoundError, OSError) as e:
        print(f"ltjax {args.cmd}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
