"""Instruction counts of the CUDA small-M kernels (docs/cuda.md), from their SASS: no GPU needed.

    python -m benchmarks.analysis.cuda_sass [--arch 90|80] [--cuobjdump PATH] [--out PATH]

Builds the kernels' `.cu` source (under `ltjax/ffi/`) with nvcc for one architecture (ptxas -v for
registers and spills), disassembles it with cuobjdump, and per kernel reports the instructions of
its main loop and, for the bitmask kernels, of the aligned path that decodes one mask word (the
branch the per-word bounds check takes when every packed word it reads lies inside the array).
Per-element figures divide a loop step (without the byte-by-byte path) by the 32 elements a lane
handles in it, one mask word; int8: the loop by its 16 codes per chunk times the chunks unrolled.
Where the word's path holds a loop of its own (the M >= 3 GEMVs decode mask bytes two at a time)
there is no static count per step, and none is given. Default output:
``benchmarks/results/<date>-sass/cuda_sass_sm<arch>.json``.

cuobjdump comes with the CUDA toolkit; where nvcc was installed without it, pass its path (the
`triton` package carries one in triton/backends/nvidia/bin/).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

INS = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
OPCODE = lambda text: re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def find_cuobjdump(given: str | None) -> str:
    if given:
        return given
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        cand = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        if cand.exists():
            return str(cand)
    except ImportError:
        pass
    sys.exit("cuobjdump not found: pass --cuobjdump PATH")


def cuda_source() -> Path:
    """The CUDA kernels' source: the one `.cu` file under `ltjax/ffi/`."""
    found = sorted((ROOT / "ltjax" / "ffi").rglob("*.cu"))
    if len(found) != 1:
        sys.exit(f"expected one .cu file under {ROOT / 'ltjax/ffi'}, found {[str(p) for p in found]}")
    return found[0]


def build(arch: str, workdir: Path) -> tuple[Path, str]:
    import jax

    src = cuda_source()
    includes = [f"-I{d}" for d in dict.fromkeys([src.parent, src.parent.parent, ROOT / "ltjax" / "ffi"])]
    cubin = workdir / f"gemv_sm{arch}.cubin"
    cmd = ["nvcc", "-O3", "-std=c++17", "-cubin", "-Xptxas", "-v", f"-I{jax.ffi.include_dir()}", *includes,
           f"-arch=sm_{arch}", "-o", str(cubin), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return cubin, proc.stderr


def ptxas_registers(log: str) -> dict[str, dict]:
    out, name = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            spill = re.findall(r"(\d+) bytes spill (stores|loads)", log.split(name, 1)[1].split("Compiling", 1)[0])
            out[name] = {"registers": int(m.group(1)), "spill_bytes": sum(int(b) for b, _ in spill)}
    return out


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    out = {}
    for part in sass.split("Function : ")[1:]:
        name = part.split("\n", 1)[0].strip()
        out[name] = [(int(m.group(1), 16), m.group(2).strip()) for m in map(INS.match, part.splitlines()) if m]
    return out


def analyse(ins: list[tuple[int, str]]) -> dict:
    """The longest backward branch's body (the main loop) and, inside it, the aligned word path."""
    backs = []
    for a, t in ins:
        m = re.search(r"\bBRA\b(?:\s+P\d+,)?\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            backs.append((int(m.group(1), 16), a))
    res = {"instructions": len(ins), "histogram": dict(collections.Counter(OPCODE(t) for _, t in ins).most_common())}
    if not backs:
        return res
    lo, hi = max(backs, key=lambda p: p[1] - p[0])
    loop = [(a, t) for a, t in ins if lo <= a <= hi]
    res["loop"] = {"instructions": len(loop),
                   "histogram": dict(collections.Counter(OPCODE(t) for _, t in loop).most_common())}
    # The per-word bounds check: "@!P0 BRA P1, <aligned path>"; the path ends at the next BSYNC.
    fast = [(a, int(m.group(1), 16)) for a, t in loop if (m := re.search(r"BRA P\d+, 0x([0-9a-f]+)", t))]
    if fast:
        branch, start = fast[0]
        end = min(a for a, t in ins if a > start and t.startswith("BSYNC"))
        path = [t for a, t in ins if start <= a < end]
        slow = [t for a, t in ins if branch < a < start]
        inner = any((m := re.search(r"\bBRA\b.*0x([0-9a-f]+)", t)) and start <= int(m.group(1), 16) < a
                    for a, t in ins if start <= a < end)
        res["aligned_word_path"] = {"instructions": len(path),
                                    "histogram": dict(collections.Counter(OPCODE(t) for t in path).most_common())}
        if inner:  # a loop inside the word's path (mask bytes decoded two at a time): no static count per step
            res["aligned_word_path"]["note"] = "contains a loop: its static count is not what a step executes"
        else:
            res["step_on_aligned_path"] = len(loop) - len(slow)  # the loop without the byte-by-byte path
    return res


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return proc.stdout.strip() or "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="90", help="the SASS architecture: 90 for sm_90, 80 for sm_80, ...")
    p.add_argument("--cuobjdump", help="cuobjdump's path, where it is not on PATH")
    p.add_argument("--out", help="JSON output path (default benchmarks/results/<date>-sass/cuda_sass_sm<arch>.json)")
    a = p.parse_args(argv)
    tool = find_cuobjdump(a.cuobjdump)
    with tempfile.TemporaryDirectory() as d:
        cubin, log = build(a.arch, Path(d))
        sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    regs = ptxas_registers(log)
    kernels = {}
    for name, ins in functions(sass).items():
        short = re.search(r"(BitmaskInt8Gemv|BitmaskInt8Mma|Int8Gemv|Int8Mma)ILi(\d+)E", name)
        key = f"{short.group(1)}<{short.group(2)}>" if short else name
        kernels[key] = {**regs.get(name, {}), **analyse(ins)}
        k = kernels[key]
        if "step_on_aligned_path" in k:  # one mask word (32 elements) per lane per step
            k["per_element"] = round(k["step_on_aligned_path"] / 32, 2)
        elif short and short.group(1) == "Int8Gemv" and "loop" in k:  # 16 codes a chunk, 4 unrolled at M = 1, else 2
            k["per_element"] = round(k["loop"]["instructions"] / (16 * (4 if short.group(2) == "1" else 2)), 2)
        elif short and short.group(1) == "Int8Mma" and "loop" in k:  # a step: 16 codes of each of two rows a lane
            k["per_element"] = round(k["loop"]["instructions"] / 32, 2)
        print(f"{key:22s} regs {k.get('registers')}  spill {k.get('spill_bytes')}  "
              f"loop {k.get('loop', {}).get('instructions')}"
              + (f"  aligned word {k['aligned_word_path']['instructions']}" if "aligned_word_path" in k else "")
              + (f"  step {k['step_on_aligned_path']}" if "step_on_aligned_path" in k else "")
              + (f"  per element {k['per_element']}" if "per_element" in k else ""))
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    out = Path(a.out or ROOT / f"benchmarks/results/{date}-sass/cuda_sass_sm{a.arch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"arch": f"sm_{a.arch}", "source": str(cuda_source().relative_to(ROOT)), "date": date,
                               "commit": _commit(),
                               "note": "static SASS counts; per_element = (loop - byte-by-byte path) / 32",
                               "kernels": kernels}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
