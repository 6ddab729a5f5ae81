"""Loads the compiled CPU handlers (`_ltjax_ffi`) and registers their XLA FFI targets at import."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import logging
import os
import sys
from pathlib import Path

import jax

logger = logging.getLogger("ltjax")

_MODULE = "ltjax.ffi._ltjax_ffi"
_BUILD_INFO = Path(__file__).with_name("_build_info.txt")

_state: dict = {
    "loaded": False, "reason": None, "path": None, "isa": None, "vnni": False, "amx": False, "threads": None,
    "targets": (), "logged": False,
}


def _extension_files(ffi_dir: Path) -> list[Path]:
    return [p for suf in importlib.machinery.EXTENSION_SUFFIXES for p in sorted(ffi_dir.glob(f"_ltjax_ffi{suf}"))]


def _distribution_extensions() -> list[Path]:
    """Built extension files the installed ltjax distribution lists (that exist)."""
    try:
        dist = importlib.metadata.distribution("ltjax")
    except importlib.metadata.PackageNotFoundError:
        return []
    files = [Path(dist.locate_file(f)) for f in dist.files or ()
             if f.name.startswith("_ltjax_ffi") and f.parent.name == "ffi"]
    return [f for f in files if f.is_file()]


def _other_installs(package: Path, search: list[str] | None = None) -> list[Path]:
    """ltjax packages with a built extension other than the imported one (``package``): on
    ``search`` (default sys.path) and where the installed distribution's files are. An editable
    install's directory of built files (no ``__init__.py``) is not a package and is not listed."""
    dirs = [Path(e or ".") / "ltjax" for e in (sys.path if search is None else search)]
    if search is None:
        dirs += [f.parents[1] for f in _distribution_extensions()]
    out = []
    for d in dirs:
        try:
            d = d.resolve()
        except OSError:
            continue
        if d != package and d not in out and (d / "__init__.py").is_file() and _extension_files(d / "ffi"):
            out.append(d)
    return out


def diagnose_missing(error: BaseException, package: Path | None = None, search: list[str] | None = None,
                     build_info: Path | None = None) -> str:
    """Why the extension did not import, and how to fix it: the imported ltjax (``package``) is a
    source tree without the built ``_ltjax_ffi*.so`` while an installed ltjax with it exists
    (shadowed: running from a checkout puts it first on sys.path), or the build was skipped or
    failed (``_build_info.txt`` says why), or the built file exists and fails to load."""
    package = (package or Path(__file__).resolve().parents[1]).resolve()
    build_info = _BUILD_INFO if build_info is None else build_info
    built = _extension_files(package / "ffi")
    if built:
        return (f"the C++ extension {built[0]} failed to load ({type(error).__name__}: {error}); rebuild it "
                f"against this Python and jax: `pip install -e .` in the checkout, or reinstall ltjax")
    why = build_info.read_text().strip() if build_info.exists() else f"{type(error).__name__}: {error}"
    msg = f"the C++ extension is not built for the ltjax imported from {package} ({why})"
    checkout = package.parent if (package.parent / "pyproject.toml").is_file() else None
    others = _other_installs(package, search)
    if others:
        return (f"{msg}: that is a source tree without the built ltjax/ffi/_ltjax_ffi*.so, and it shadows the "
                f"installed ltjax at {others[0]}, which has the extension (the source tree comes first on "
                f"sys.path: `python -m` and scripts put the directory they run from there). Fix: `pip install -e .` in {checkout or package.parent} (an editable "
                f"install: the checkout itself gets the extension), or run from outside the checkout")
    dist_built = _distribution_extensions() if search is None else []
    if dist_built:  # e.g. an editable install whose import hook is not active in this interpreter
        return (f"{msg}: the installed ltjax distribution has it at {dist_built[0]}, which this import did not "
                f"find. Fix: `pip install -e .` in {checkout or 'the checkout'} with this Python, or run from "
                f"outside the checkout")
    if checkout is not None:
        return (f"{msg}. Fix: `pip install -e .` in {checkout} (builds the extension; needs a C++ compiler and "
                f"CMake)")
    return f"{msg}. Fix: reinstall ltjax where a C++ compiler and CMake are available"


def _load() -> None:
    if os.environ.get("LTJAX_DISABLE_FFI", "") not in ("", "0"):
        _state["reason"] = "disabled by the LTJAX_DISABLE_FFI environment variable"
        return
    try:
        mod = importlib.import_module(_MODULE)
    except ImportError as e:
        _state["reason"] = diagnose_missing(e)
        return
    isa = mod.isa()
    _state["path"] = getattr(mod, "__file__", None)
    if isa == "none":
        _state["reason"] = "this CPU lacks AVX2/FMA, which the handlers need"
        return
    targets = mod.targets()
    for name, capsule in targets.items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    _state.update(
        loaded=True, path=getattr(mod, "__file__", None), isa=isa, vnni=mod.vnni() or False, amx=bool(mod.amx()), threads=mod.num_threads(),
        targets=tuple(sorted(targets)),
    )


def available() -> bool:
    """True when the CPU handlers are built, loaded and registered."""
    return _state["loaded"]


def unavailable_reason() -> str | None:
    """Why the CPU fast path is off (extension missing / failed to build / CPU lacks AVX2), or None."""
    return None if _state["loaded"] else _state["reason"]


def log_unavailable_once() -> None:
    if not _state["loaded"] and not _state["logged"]:
        _state["logged"] = True
        logger.warning("ltjax: CPU FFI kernels unavailable, using the XLA path: %s", _state["reason"])


def info() -> dict:
    """Whether the handlers loaded (and why not), the extension's file, instruction set, VNNI use,
    thread count (for benchmarks and `ltjax info`)."""
    return {k: _state[k] for k in ("loaded", "reason", "path", "isa", "vnni", "amx", "threads", "targets")}


_load()
