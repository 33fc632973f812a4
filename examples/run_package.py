"""Run a DToP model package with plain PyTorch: no ``import dtop_kernels``.

    python examples/run_package.py MODEL.pt2 LIBDTOP_OPS.so BATCH

What a serving process needs is the package (``dtop_kernels.export`` / ``dtop-export`` wrote
it) and the op library (``dtop_kernels.ops_library_path()`` says where the install keeps it):
load the library, then the package. The input is the deterministic batch of
``examples/cpp/run_package.cpp`` (sin(0.001 * i) over the elements), and the output lines are
the same, so the two can be compared.
"""

from __future__ import annotations

import re
import sys

import torch
import torch._inductor


def load(package: str, library: str):
    """The package's runner, after loading the op library. A missing op names the library."""
    torch.ops.load_library(library)
    try:
        return torch._inductor.aoti_load_package(package)
    except RuntimeError as e:
        match = re.search(r"schema for (dtop::\w+)", str(e))
        if match:
            raise RuntimeError(f"{package} calls {match.group(1)}, which {library} does not "
                               "define: load the op library the package was exported with "
                               "(dtop_kernels.ops_library_path())") from e
        raise


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    package, library, batch = argv[0], argv[1], int(argv[2])
    runner = load(package, library)
    meta = runner.get_metadata()
    image = [int(d) for d in meta["dtop_kernels.image"].split(",")]
    shape = [batch, *image]
    numel = 1
    for d in shape:
        numel *= d
    img = torch.arange(numel, dtype=torch.float32).mul(0.001).sin().reshape(shape)
    with torch.no_grad():
        outputs = runner(img)
    pred = outputs[0]
    print(f"pred: shape {list(pred.shape)} sum {pred.double().sum().item():.10g}")
    if len(outputs) > 1:
        counts = torch.bincount(outputs[1].flatten()).tolist()
        print(f"exit_stage: shape {list(outputs[1].shape)} counts {' '.join(map(str, counts))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
