"""Configuration: every environment variable ltjax reads, read once, and the host platform.

`settings()` reads the environment the first time it is called and keeps the result; tests
that change a variable call `settings.cache_clear()`. The C++ extension does not read the
environment itself: `ltjax.ffi.cpu` hands it `settings()` when it loads. README.md
("Configuration") lists the same variables; `tests/test_config.py` keeps the two in step.

Knobs whose value no measurement has set yet are listed in `EXPERIMENTAL`, with what would
set them: they are parameters of the code, not advice.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax

logger = logging.getLogger("ltjax")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(name: str, value: str | None) -> bool | None:
    """"1"/"true"/"yes"/"on" → True, "0"/"false"/"no"/"off" → False, unset or empty → None."""
    if value is None or not value.strip():
        return None
    v = value.strip().lower()
    if v not in _TRUE + _FALSE:
        raise ValueError(f"${name}={value!r}: use 1 or 0 (or true/false, yes/no, on/off), or leave it unset")
    return v in _TRUE


def _int(name: str, value: str | None) -> int | None:
    """A non-negative integer; unset or empty → None."""
    if value is None or not value.strip():
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not an integer") from None
    if n < 0:
        raise ValueError(f"${name}={value!r} must be >= 0")
    return n


@dataclasses.dataclass(frozen=True)
class Settings:
    """The environment as ltjax reads it (None: unset, the default applies)."""

    pallas_interpret: bool | None  # LTJAX_PALLAS_INTERPRET: Pallas kernels in interpret mode (default: off-GPU)
    pallas_tuned: str | None  # LTJAX_PALLAS_TUNED: a tuned block-size table file over the built-in one
    cuda_gemv: bool  # LTJAX_CUDA_GEMV=1: impl=None may pick the CUDA small-M kernels (untimed: off)
    disable_ffi: bool  # LTJAX_DISABLE_FFI=1: never load the CPU extension
    ffi_isa: str | None  # LTJAX_FFI_ISA=avx2: the CPU handlers' instruction set (default: the best present)
    ffi_vnni: bool | None  # LTJAX_FFI_VNNI=0: the integer (VNNI, int4 AVX2) paths off
    ffi_amx: bool | None  # LTJAX_FFI_AMX=0: the AMX int8 GEMM off
    ffi_threads: int | None  # LTJAX_FFI_THREADS: the handlers' thread count (default: the cores)
    ffi_spin_us: int | None  # LTJAX_FFI_SPIN_US: how long idle handler threads spin before sleeping


VARIABLES = {  # name: (Settings field, what it does): the README table
    "LTJAX_PALLAS_INTERPRET": ("pallas_interpret", "1: Pallas kernels in interpret mode (default: on a GPU 0, else 1)"),
    "LTJAX_PALLAS_TUNED": ("pallas_tuned", "a tuned block-size file (`benchmarks.pallas_sweep --write-tuned`) over "
                                           "the built-in table"),
    "LTJAX_CUDA_GEMV": ("cuda_gemv", "1: `impl=None` may pick the CUDA small-M kernels on a GPU (off until timed)"),
    "LTJAX_DISABLE_FFI": ("disable_ffi", "1: do not load the CPU extension (the XLA path everywhere on CPU)"),
    "LTJAX_FFI_ISA": ("ffi_isa", "avx2: the CPU handlers' AVX2 code even where AVX-512 is present"),
    "LTJAX_FFI_VNNI": ("ffi_vnni",
                       "0: the CPU handlers' integer paths off (VNNI; int4's AVX2 GEMV): their f32 walks run"),
    "LTJAX_FFI_AMX": ("ffi_amx", "0: the AMX int8 GEMM off"),
    "LTJAX_FFI_THREADS": ("ffi_threads", "the CPU handlers' threads (default: the cores)"),
    "LTJAX_FFI_SPIN_US": ("ffi_spin_us", "microseconds idle handler threads spin before sleeping"),
}

# Knobs no measurement has set yet, and what would set them.
EXPERIMENTAL = {
    "ltjax.ffi.cuda.MMA_WARPS": "K splits of the CUDA tensor-core kernels aim at this many warps; a GPU run of "
                                "benchmarks/cuda_kernels.py times 1024-8192 (t_mma_warps_ms)",
    "LTJAX_CUDA_GEMV": "the CUDA small-M kernels are opt-in until benchmarks/gpu_check.sh has timed them on a GPU",
}


@functools.cache
def settings() -> Settings:
    """The environment, read once (`settings.cache_clear()` rereads it)."""
    env = os.environ.get
    isa = (env("LTJAX_FFI_ISA") or "").strip().lower() or None
    if isa not in (None, "avx2", "avx512"):
        raise ValueError(f"$LTJAX_FFI_ISA={env('LTJAX_FFI_ISA')!r}: choose 'avx2' or 'avx512' (or leave it unset)")
    return Settings(
        pallas_interpret=_flag("LTJAX_PALLAS_INTERPRET", env("LTJAX_PALLAS_INTERPRET")),
        pallas_tuned=(env("LTJAX_PALLAS_TUNED") or "").strip() or None,
        cuda_gemv=bool(_flag("LTJAX_CUDA_GEMV", env("LTJAX_CUDA_GEMV"))),
        disable_ffi=bool(_flag("LTJAX_DISABLE_FFI", env("LTJAX_DISABLE_FFI"))),
        ffi_isa=isa,
        ffi_vnni=_flag("LTJAX_FFI_VNNI", env("LTJAX_FFI_VNNI")),
        ffi_amx=_flag("LTJAX_FFI_AMX", env("LTJAX_FFI_AMX")),
        ffi_threads=_int("LTJAX_FFI_THREADS", env("LTJAX_FFI_THREADS")),
        ffi_spin_us=_int("LTJAX_FFI_SPIN_US", env("LTJAX_FFI_SPIN_US")),
    )


def host_platform() -> str:
    """This host's default platform as a lowering platform name: ``"cpu"``, ``"cuda"``, ``"rocm"``, ...

    JAX reports both kinds of GPU as the backend ``"gpu"``; the client's platform version tells them apart.
    """
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
    return "rocm" if "rocm" in version else "cuda"


def is_gpu(platform: str | None = None) -> bool:
    """Whether ``platform`` (default: this host's) is a GPU."""
    return (platform or host_platform()) in ("cuda", "rocm", "gpu")


_LOGGED: set[str] = set()


def log_once(key: str, message: str, *args, level: int = logging.INFO) -> None:
    """Logs ``message`` on the ``"ltjax"`` logger once per process and ``key``: fallbacks are never
    silent, and never repeated."""
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.log(level, message, *args)
