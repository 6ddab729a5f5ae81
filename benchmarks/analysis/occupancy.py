"""How many programs of each Pallas kernel a Hopper SM holds, from an offline compile check's registers.

    python -m benchmarks.analysis.occupancy CHECK.json [OUT.json]

CHECK.json is what ``../shared/tools/triton-offline-check DIR --cc 90 --json CHECK.json`` writes for
IR dumped by `benchmarks.analysis.triton_ir`; its sm_90 rows give each kernel's registers, warps,
shared memory and grid. Per kernel: the programs an H100/H200 SM holds at once (`occupancy`), what
limits them, and the resident warps and waves the grid gives each SM.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

# Hopper (sm_90) per-SM limits, and the SM count of an H100 / H200 SXM.
SM90 = dict(regs=65536, warps=64, blocks=32, shared=228 * 1024, sms=132)


def occupancy(regs: int, num_warps: int, shared: int, programs: int, hw: dict = SM90) -> dict:
    """Programs of one kernel an SM holds at once (registers allocated per warp in units of 256, the
    tightest of the register, warp, block and shared-memory limits), and what a grid of ``programs``
    gives each SM: resident warps, and waves (``programs`` over what all SMs hold at once)."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = dict(regs=hw["regs"] // (regs_per_warp * num_warps), warps=hw["warps"] // num_warps,
                  blocks=hw["blocks"], shared=hw["shared"] // shared if shared else hw["blocks"])
    per_sm = min(limits.values())
    resident = min(per_sm, -(-programs // hw["sms"]))
    return dict(programs_per_sm=per_sm, limited_by=min(limits, key=limits.get), programs=programs,
                warps_per_sm=resident * num_warps, waves=programs / (per_sm * hw["sms"]) if per_sm else float("inf"))


def occupancy_table(check_json: str, out_json: str | None = None) -> list[dict]:
    """The sm_90 rows of a check's JSON with their `occupancy`, printed (and written to ``out_json``)."""
    with open(check_json) as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "regs" in r for r in rows):
        raise SystemExit(f"{check_json}: not a triton-offline-check --json output (a list of kernel rows with 'regs')")
    out = []
    for r in rows:
        if r.get("cc") != 90 or r.get("status") != "OK":
            continue
        programs = int(np.prod(r["grid"]))
        out.append(dict(kernel=r["kernel"], regs=r["regs"], num_warps=r["num_warps"], shared=r["shared"],
                        **occupancy(r["regs"], r["num_warps"], r["shared"], programs)))
    for o in out:
        print(f"{o['kernel'][:100]:<100} regs {o['regs']:>3} w{o['num_warps']} {o['programs_per_sm']:>2}/SM "
              f"({o['limited_by']:>6}) grid {o['programs']:>6} -> {o['warps_per_sm']:>2} warps/SM, "
              f"{o['waves']:.2f} waves")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(dict(source=os.path.basename(check_json), limits=SM90, rows=out), f, indent=1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("check_json", metavar="CHECK.json", help="a triton-offline-check --json output")
    ap.add_argument("out_json", metavar="OUT.json", nargs="?", help="where to write the table (JSON)")
    a = ap.parse_args(argv)
    occupancy_table(a.check_json, a.out_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
