"""``python -m dtop_kernels.info``: versions, the compiled module, and what each backend can run.

Nothing here initializes CUDA unless a GPU is present and asked about (device name/capability).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import dtop_kernels
from dtop_kernels import backends
from dtop_kernels.backends import BACKENDS
from dtop_kernels.cuda import build_info, unavailable_reasons
from dtop_kernels.triton import import_error as triton_import_error
from dtop_kernels.triton import interpret as triton_interpret


def _probe_tensors(device: str) -> dict[str, object]:
    """Small inputs on ``device`` to ask each op's backends about."""
    from dtop_kernels.tokens import TokenSet

    t = TokenSet.all_active(1, 4, device=device)
    x = torch.zeros(1, 4, 8, device=device, dtype=torch.float16)
    q = torch.zeros(4, 1, 8, device=device, dtype=torch.float16)
    return {
        "gather_tokens": (x, t),
        "scatter_tokens": (x[0], t),
        "varlen_attention": (q, q, q),
        "packed_linear": (x[0], torch.zeros(8, 8, device=device, dtype=torch.float16), t),
        "pruned_block": (x, t),
        "dtop_select": (torch.zeros(1, 2, 2, device=device), torch.zeros(2, 4, device=device), t),
    }


def shadowed_install() -> Path | None:
    """The installed package's folder when the imported ``dtop_kernels`` is another copy (a
    source checkout ahead of site-packages on ``sys.path``, e.g. the current directory), else
    None."""
    from importlib.metadata import distributions

    here = Path(dtop_kernels.__file__).resolve().parent
    for dist in distributions(name="dtop-kernels"):
        init = Path(str(dist.locate_file("dtop_kernels/__init__.py")))
        if init.is_file() and init.resolve().parent != here:
            return init.resolve().parent
    return None


def report() -> str:
    where = Path(dtop_kernels.__file__).resolve().parent
    lines = [f"dtop_kernels {dtop_kernels.__version__} (imported from {where})"]
    lines.append(f"python {platform.python_version()}, torch {torch.__version__} "
                 f"(CUDA {torch.version.cuda or 'none'})")
    terr = triton_import_error()
    if terr:
        lines.append(f"triton: unavailable ({terr})")
    else:
        import triton

        lines.append(f"triton {triton.__version__}" +
                     (" (TRITON_INTERPRET=1: CPU interpreter)" if triton_interpret() else ""))
    info = build_info()
    if info.get("cuda_built"):
        from dtop_kernels.cuda import load_C

        archs = info.get("archs", "?")
        try:
            mod = load_C()
            archs = mod.built_archs()
            rt = mod.cuda_runtime_version()
            lines.append(f"_C: built for {archs} with CUDA runtime {rt // 1000}.{rt % 1000 // 10}"
                         f" (nvcc {info.get('nvcc_version', '?')})")
        except Exception as e:  # noqa: BLE001 - reported, not raised
            lines.append(f"_C: built for {archs} but fails to import: {e}")
    else:
        lines.append(f"_C: not built ({info.get('reason', 'unknown')})")
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        cap = torch.cuda.get_device_capability()
        lines.append(f"GPU: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append("GPU: none visible to torch")
    cuda_r = unavailable_reasons()
    lines.append("compiled module: " + ("importable" if not cuda_r else "; ".join(cuda_r)))
    for device in ["cpu"] + (["cuda"] if has_gpu else []):
        probes = _probe_tensors(device)
        lines.append(f"\nbackends on {device} tensors:")
        for d in map(backends.dispatcher, backends.ops()):
            reasons = d.reasons(*probes[d.op])
            order = [b for b in d.auto_order if b not in d.unverified]
            auto = next((b for b in order if not reasons[b]), "none")
            lines.append(f"  {d.op}: auto -> {auto} (auto order: {' > '.join(order)})")
            for name in BACKENDS:
                r = reasons[name]
                ok = "can run" + (" (unverified on a GPU: explicit backend only)"
                                  if name in d.unverified else "")
                lines.append(f"    {name:6s} " + (ok if not r else "no: " + "; ".join(r)))
    return "\n".join(lines)


def cuda_kernel_problems() -> list[str]:
    """Why the CUDA kernels cannot run on this machine's GPU ([] when they can)."""
    from dtop_kernels.cuda import device_reasons

    problems = list(unavailable_reasons())
    if not torch.cuda.is_available():
        problems.append("no CUDA device visible to torch")
    elif not problems:
        problems += device_reasons(torch.device("cuda", torch.cuda.current_device()))
    return problems


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m dtop_kernels.info",
        description="Print versions, the compiled CUDA module's build, and which backend each "
                    "op can run on here (and why not).")
    ap.add_argument("--require-cuda-kernels", action="store_true",
                    help="exit with status 1 unless the compiled CUDA kernels import and have a "
                         "kernel image for this machine's GPU (for scripts that test them)")
    args = ap.parse_args(argv)
    installed = shadowed_install()
    if installed is not None and not os.environ.get("DTOP_INFO_NO_REEXEC"):
        here = Path(dtop_kernels.__file__).resolve().parent
        print(f"note: `dtop_kernels` here is the source tree {here} (the current directory "
              f"comes first on sys.path); it shadows the installed package {installed}, which "
              "the report below describes. Run from another directory to import the installed "
              "package.\n", flush=True)
        env = dict(os.environ, DTOP_INFO_NO_REEXEC="1")
        sys.exit(subprocess.run([sys.executable, "-m", "dtop_kernels.info", *sys.argv[1:]],
                                cwd=installed.parent, env=env, check=False).returncode)
    print(report())
    if args.require_cuda_kernels:
        problems = cuda_kernel_problems()
        if problems:
            sys.exit("--require-cuda-kernels: the CUDA kernels cannot run here: "
                     + "; ".join(problems))


if __name__ == "__main__":
    main()
