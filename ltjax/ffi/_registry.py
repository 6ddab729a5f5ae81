"""Loads the compiled CPU handlers (`_ltjax_ffi`) and registers their XLA FFI targets at import."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import jax

logger = logging.getLogger("ltjax")

_MODULE = "ltjax.ffi._ltjax_ffi"
_BUILD_INFO = Path(__file__).with_name("_build_info.txt")

_state: dict = {
    "loaded": False, "reason": None, "isa": None, "vnni": False, "amx": False, "threads": None, "targets": (),
    "logged": False,
}


def _load() -> None:
    if os.environ.get("LTJAX_DISABLE_FFI", "") not in ("", "0"):
        _state["reason"] = "disabled by the LTJAX_DISABLE_FFI environment variable"
        return
    try:
        mod = importlib.import_module(_MODULE)
    except ImportError as e:
        why = _BUILD_INFO.read_text().strip() if _BUILD_INFO.exists() else f"{type(e).__name__}: {e}"
        _state["reason"] = f"the C++ extension is not built ({why})"
        return
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


def log_unavailable_once() -> None:
    if not _state["loaded"] and not _state["logged"]:
        _state["logged"] = True
        logger.warning("ltjax: CPU FFI kernels unavailable, using the XLA path: %s", _state["reason"])


def info() -> dict:
    """Instruction set, VNNI use, thread count of the loaded handlers (for benchmarks)."""
    return {k: _state[k] for k in ("loaded", "reason", "isa", "vnni", "amx", "threads", "targets")}


_load()
