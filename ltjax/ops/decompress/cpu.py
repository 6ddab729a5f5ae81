"""`decompress` of the bitmask codecs on the CPU handlers (`ltjax.ffi.cpu`): about 4.5x XLA's gather."""

from __future__ import annotations

import logging

import jax

from ltjax._config import host_platform, log_once
from ltjax._format import CompressedTensor, from_storage
from ltjax.ops._dispatch import Implementation, explicit_sharding

try:
    from ltjax.ffi import cpu as _cpu
except ImportError:  # pragma: no cover - an installation without the CPU handlers' Python side
    _cpu = None


def why_not(ct: CompressedTensor, *, platform: str, interpret: bool) -> str | None:
    if _cpu is None:
        return "ltjax.ffi.cpu is not available in this installation"
    if not _cpu.available():  # a broken install, not a routine fallback: said once, as a warning
        log_once(_cpu.unavailable_reason(), "ltjax: CPU FFI kernels unavailable, using the XLA path: %s",
                 _cpu.unavailable_reason(), level=logging.WARNING)  # the same key as the registry walk's note
        return _cpu.unavailable_reason()
    if host_platform() != "cpu":  # the extension and its ISA are this host's
        return f"the CPU handlers are chosen where the program is traced on a CPU host; this one is {host_platform()!r}"
    if explicit_sharding(ct) is not None:
        return f"the handlers take unsharded operands; {explicit_sharding(ct)} is sharded"
    if jax.device_count() > 1:  # a custom call is not partitioned: its operands would be all-gathered
        return f"FFI custom calls are not partitioned across the {jax.device_count()} devices"
    return _cpu.why_not_unpack(ct)


def run(ct: CompressedTensor, *, interpret: bool) -> jax.Array:
    return from_storage(_cpu.unpack(ct), ct.header)


IMPL = Implementation("ffi", ("cpu",), False, why_not, run)
