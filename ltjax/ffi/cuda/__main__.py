"""``python -m ltjax.ffi.cuda --build [OUT.so]``: builds the CUDA kernels' library with nvcc
(default: ``_ltjax_cuda.so`` beside the package, where `ltjax.ffi.cuda.library` looks first)."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from ltjax.ffi.cuda import nvcc_command


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ltjax.ffi.cuda", description=__doc__)
    p.add_argument("--build", metavar="OUT.so", nargs="?", const=str(Path(__file__).with_name("_ltjax_cuda.so")),
                   required=True, help="build the library, here (default: beside this package)")
    args = p.parse_args(argv)
    return subprocess.run(nvcc_command(args.build)).returncode


if __name__ == "__main__":  # python -m ltjax.ffi.cuda --build OUT.so
    raise SystemExit(main())
