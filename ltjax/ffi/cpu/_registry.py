"""Loads the compiled CPU handlers (`_ltjax_ffi`), configures them from `ltjax._config.settings()`
and registers their XLA FFI targets, at import."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import sys
from pathlib import Path

import jax

from ltjax._config import settings

_MODULE = "ltjax.ffi.cpu._ltjax_ffi"
_SUBDIR = ("ffi", "cpu")  # where the extension sits in the ltjax package
_BUILD_INFO = Path(__file__).with_name("_build_info.txt")

_state: dict = {
    "loaded": False, "reason": None, "path": None, "isa": None, "vnni": False, "amx": False, "threads": None,
    "targets": (),
}


def _extension_files(package: Path) -> list[Path]:
    """The built extension files of the ltjax package at ``package``."""
    d = package.joinpath(*_SUBDIR)
    return [p for suf in importlib.machinery.EXTENSION_SUFFIXES for p in sorted(d.glob(f"_ltjax_ffi{suf}"))]


def _distribution_extensions() -> list[Path]:
    """Built extension files the installed ltjax distribution lists (that exist)."""
    try:
        dist = importlib.metadata.distribution("ltjax")
    except importlib.metadata.PackageNotFoundError:
        return []
    files = [Path(dist.locate_file(f)) for f in dist.files or ()
             if f.name.startswith("_ltjax_ffi") and f.parts[-3:-1] == ("ffi", "cpu")]
    return [f for f in files if f.is_file()]


def _other_installs(package: Path, search: list[str] | None = None) -> list[Path]:
    """ltjax packages with a built extension other than the imported one (``package``): on
    ``search`` (default sys.path) and where the installed distribution's files are. An editable
    install's directory of built files (no ``__init__.py``) is not a package and is not listed."""
    dirs = [Path(e or ".") / "ltjax" for e in (sys.path if search is None else search)]
    if search is None:
        dirs += [f.parents[2] for f in _distribution_extensions()]
    out = []
    for d in dirs:
        try:
            d = d.resolve()
        except OSError:
            continue
        if d != package and d not in out and (d / "__init__.py").is_file() and _extension_files(d):
            out.append(d)
    return out


def diagnose_missing(error: BaseException, package: Path | None = None, search: list[str] | None = None,
                     build_info: Path | None = None) -> str:
    """Why the extension did not import, and how to fix it: the imported ltjax (``package``) is a
    source tree without the built ``_ltjax_ffi*.so`` while an installed ltjax with it exists
    (shadowed: running from a checkout puts it first on sys.path), or the build was skipped or
    failed (``_build_info.txt`` says why), or the built file exists and fails to load."""
    package = (package or Path(__file__).resolve().parents[2]).resolve()
    build_info = _BUILD_INFO if build_info is None else build_info
    built = _extension_files(package)
    if built:
        return (f"the C++ extension {built[0]} failed to load ({type(error).__name__}: {error}); rebuild it "
                f"against this Python and jax: `pip install -e .` in the checkout, or reinstall ltjax")
    why = build_info.read_text().strip() if build_info.exists() else f"{type(error).__name__}: {error}"
    msg = f"the C++ extension is not built for the ltjax imported from {package} ({why})"
    checkout = package.parent if (package.parent / "pyproject.toml").is_file() else None
    others = _other_installs(package, search)
    if others:
        return (f"{msg}: that is a source tree without the built ltjax/ffi/cpu/_ltjax_ffi*.so, and it shadows the "
                f"installed ltjax at {others[0]}, which has the extension (the source tree comes first on "
                f"sys.path: `python -m` and scripts put the directory they run from there). Fix: `pip install -e .` "
                f"in {checkout or package.parent} (an editable install: the checkout itself gets the extension), or "
                f"run from outside the checkout")
    dist_built = _distribution_extensions() if search is None else []
    if dist_built:  # e.g. an editable install whose import hook is not active in this interpreter
        return (f"{msg}: the installed ltjax distribution has it at {dist_built[0]}, which this import did not "
                f"find. Fix: `pip install -e .` in {checkout or 'the checkout'} with this Python, or run from "
                f"outside the checkout")
    if checkout is not None:
        return (f"{msg}. Fix: `pip install -e .` in {checkout} (builds the extension; needs a C++ compiler and "
                f"CMake)")
    return f"{msg}. Fix: reinstall ltjax where a C++ compiler and CMake are available"


def _configure(mod) -> None:
    """Hands the extension this process's settings (LTJAX_FFI_*), before anything fixes its choices."""
    s = settings()
    mod.configure(s.ffi_isa or "", s.ffi_vnni is not False, s.ffi_amx is not False,
                  -1 if s.ffi_threads is None else s.ffi_threads, -1 if s.ffi_spin_us is None else s.ffi_spin_us)


def _load() -> None:
    if settings().disable_ffi:
        _state["reason"] = "disabled by the LTJAX_DISABLE_FFI environment variable"
        return
    try:
        mod = importlib.import_module(_MODULE)
    except ImportError as e:
        _state["reason"] = diagnose_missing(e)
        return
    _state["path"] = getattr(mod, "__file__", None)
    if not hasattr(mod, "configure"):
        _state["reason"] = (f"the C++ extension {_state['path']} predates this ltjax (it has no configure()); "
                            f"rebuild it: `pip install -e .` in the checkout, or reinstall ltjax")
        return
    _configure(mod)
    isa = mod.isa()
    if isa == "none":
        _state["reason"] = "this CPU lacks AVX2/FMA, which the handlers need"
        return
    targets = mod.targets()
    for name, capsule in targets.items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    _state.update(
        loaded=True, isa=isa, vnni=mod.vnni() or False, amx=bool(mod.amx()), threads=mod.num_threads(),
        targets=tuple(sorted(targets)),
    )


def available() -> bool:
    """True when the CPU handlers are built, loaded and registered."""
    return _state["loaded"]


def unavailable_reason() -> str | None:
    """Why the CPU fast path is off (extension missing / failed to build / CPU lacks AVX2), or None."""
    return None if _state["loaded"] else _state["reason"]


def info() -> dict:
    """Whether the handlers loaded (and why not), the extension's file, instruction set, VNNI use,
    thread count (for benchmarks and `ltjax info`)."""
    return {k: _state[k] for k in ("loaded", "reason", "path", "isa", "vnni", "amx", "threads", "targets")}


_load()
