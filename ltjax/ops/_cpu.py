"""What the ops' CPU-handler implementations (`matmul/cpu.py`, `decompress/cpu.py`) ask first:
is the extension loaded, and is this program one its custom calls can serve."""

from __future__ import annotations

import logging

from ltjax._config import log_once
from ltjax.ops._dispatch import custom_call_reason

try:
    from ltjax.ffi import cpu as handlers
except ImportError:  # pragma: no cover - an installation without the CPU handlers' Python side
    handlers = None


def reason(*operands) -> str | None:
    """None when the CPU handlers can be chosen for ``operands`` here, else why not."""
    if handlers is None:
        return "ltjax.ffi.cpu is not available in this installation"
    if not handlers.available():  # a broken install, not a routine fallback: said once, as a warning
        why = handlers.unavailable_reason()
        log_once(why, "ltjax: CPU FFI kernels unavailable, using the XLA path: %s", why, level=logging.WARNING)
        return why  # (the same key as the registry walk's note: one line in all)
    return custom_call_reason("CPU handlers", "cpu", *operands)
