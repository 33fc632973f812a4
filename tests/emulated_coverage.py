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


def _template(name: str) -> str:
    """The kernel (template) of a demangled instantiation name."""
    return re.search(r"\(anonymous namespace\)::(\w+)[<(]", name).group(1)


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
    # Per kernel template: a line when none of its instantiations ran, else one per missing.
    by_template: dict[str, list[str]] = {}
    for name in every:
        by_template.setdefault(_template(name), []).append(name)
    lines = []
    for template, names in sorted(by_template.items()):
        missing = sorted(n for n in names if n not in both)
        if len(missing) == len(names) and len(names) > 1:
            lines.append(f"  not run: {template} (none of its {len(names)} instantiations)")
            continue
        for name in missing:
            reason = next((r for pattern, r in LEFT_OUT.items() if re.search(pattern, name)),
                          None)
            where = [v for v in cuda_emulator.VARIANTS if name not in per_variant.get(v, set())]
            lines.append(f"  not run on {'/'.join(where)}: {name}"
                         + (f" ({reason})" if reason else ""))
    return lines, closing
