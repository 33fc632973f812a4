"""The closing line of ``pytest -m emulated``: how many CUDA kernel instantiations ran.

Y is counted from the build: every function of the emulator's module (nm) that instantiates a
``__global__`` function of csrc/ (the dispatch's switches instantiate exactly the variants a GPU
build has). X: those that ran on both the memcheck and the race build. An instantiation that no
test can reach is named here with the reason; any other one not run is listed by name.
"""

from __future__ import annotations

import re

import cuda_emulator

# Instantiations the package can never launch, with why (a regex on the demangled name).
LEFT_OUT: dict[str, str] = {}


def report(runs: dict[str, dict]) -> tuple[list[str], str]:
    """(the instantiations not run, one line each; the closing line) for ``runs``:
    {variant: {"file", "executed"}} (tests/conftest.py)."""
    per_variant: dict[str, set[str]] = {}
    every: set[str] = set()
    for variant, run in sorted(runs.items()):
        inst = cuda_emulator.instantiations(run["file"])
        every |= set(inst.values())
        per_variant[variant] = {inst[int(k)] for k in run["executed"] if int(k) in inst}
    both = set.intersection(*per_variant.values()) if per_variant else set()
    if set(per_variant) != set(cuda_emulator.VARIANTS):
        both = set()  # "run" means run under both checkers
    closing = (f"emulated kernels: {len(both)} of {len(every)} instantiations run ("
               + ", ".join(f"{v} {len(s)}" for v, s in sorted(per_variant.items())) + ")")
    lines = []
    for name in sorted(every - both):
        reason = next((r for pattern, r in LEFT_OUT.items() if re.search(pattern, name)),
                      None)
        where = [v for v in cuda_emulator.VARIANTS if name not in per_variant.get(v, set())]
        lines.append(f"  not run on {'/'.join(where)}: {name}"
                     + (f" ({reason})" if reason else ""))
    if len(lines) > 60:
        lines = lines[:59] + [f"  ... and {len(lines) - 59} more"]
    return lines, closing
