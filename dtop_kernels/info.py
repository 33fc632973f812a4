"""``python -m dtop_kernels.info``: what each backend can run here, and why not.

Short by default: versions, one line per backend, what ``backend="auto"`` picks. ``--verbose``
adds the compiled module's build record and every op's reasons per backend. Nothing here
initializes CUDA unless a GPU is present and asked about (device name/capability).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import dtop_kernels
from dtop_kernels import status
from dtop_kernels.tokens import TokenSet

PROBE_FEATURES = 64  # the probe calls' features and head dim (ViT-B's head dim)


def _probe_calls(device: str) -> dict[str, tuple]:
    """One small float16 call per op on ``device`` (1 image of 4 tokens, 64 features, one head
    of dim 64) to ask each op's backends about."""
    c = PROBE_FEATURES
    t = TokenSet.all_active(1, 4, device=device)
    x = torch.zeros(1, 4, c, device=device, dtype=torch.float16)
    q = torch.zeros(4, 1, c, device=device, dtype=torch.float16)
    return {
        "gather_tokens": (x, t),
        "scatter_tokens": (x[0], t),
        "varlen_attention": (q, q, q),
        "packed_linear": (x[0], torch.zeros(c, c, device=device, dtype=torch.float16), t),
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


def _versions() -> str:
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    terr = status.triton_import_error()
    if terr:
        triton = "triton: not installed" if "not installed" in terr else "triton: fails to import"
    else:
        import triton as _triton

        triton = f"triton {_triton.__version__}"
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        gpu = f"GPU: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})"
    else:
        gpu = "GPU: none visible to torch"
    return (f"dtop_kernels {dtop_kernels.__version__} | python {platform.python_version()} | "
            f"torch {torch.__version__} ({build}) | {triton} | {gpu}")


def _compiled_module() -> str:
    """The compiled module in one phrase: "_C: built for 80;90 with CUDA runtime 13.0 (nvcc
    13.0.88)", "_C: not built (reason)" or "_C: built ... but fails to import"."""
    info = status.cuda_build_info()
    if not info.get("cuda_built"):
        return f"_C: not built ({info.get('reason') or 'unknown'})"
    if info["import_error"]:
        return f"_C: built for {info.get('archs', '?')} but fails to import: {info['import_error']}"
    return (f"_C: built for {info['built_archs']} with CUDA runtime {info['cuda_runtime']} "
            f"(nvcc {info.get('nvcc_version', '?')})")


def _has_cuda_kernels() -> bool:
    from dtop_kernels.ops import native

    try:
        return native.has_cuda_kernels()
    except (native.OpsLibraryError, RuntimeError):
        return False


def ops_library_line() -> str:
    """The op library (export, deployment): "op library: <path> (<version>)" or why not."""
    from dtop_kernels.ops import native

    try:
        path = native.ops_library_path()
    except native.OpsLibraryError as e:
        return f"op library: not built ({e})"
    try:
        kernels = "CPU and CUDA kernels" if _has_cuda_kernels() else "CPU kernels"
        return f"op library: {path} ({native.library_version(path)}; {kernels})"
    except OSError as e:
        return f"op library: {path} fails to load: {e}"


def backend_lines() -> list[str]:
    """One line per backend: what it runs on this machine, or why not."""
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    probes = _probe_calls(device)
    unverified = " (not yet verified on a GPU: runs only when asked for by name)"

    def limits(name: str) -> str:
        refused = {op: status.backend_reasons(op, *args)[name] for op, args in probes.items()}
        refused = {op: r for op, r in refused.items() if r}
        if not refused:
            return f"runs every op on {'the GPU' if gpu else 'CPU tensors'}" + unverified
        return "no: " + "; ".join(f"{op}: {r[0]}" for op, r in refused.items())

    lines = ["torch   runs every op on any device (the PyTorch reference)"]
    terr = status.triton_import_error()
    if terr:
        triton = f"no: {terr}"
    elif gpu:
        triton = limits("triton")
    elif status.triton_interpreted():
        triton = ("runs on CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter: correct "
                  "but slow, for tests)")
    else:
        triton = ("no: needs a CUDA GPU, none visible to torch (TRITON_INTERPRET=1 runs it on "
                  "the CPU interpreter, for tests)")
    lines.append(f"triton  {triton}")
    info = status.cuda_build_info()
    module = _compiled_module()
    if not info.get("cuda_built"):
        cuda = f"no: {module}"
    elif info["import_error"]:
        cuda = f"no: {module}; rebuild it (pip install .)"
    elif not gpu:
        cuda = f"no: needs a CUDA GPU, none visible to torch ({module})"
    else:
        problems = status.cuda_kernel_problems()
        cuda = f"no: {'; '.join(problems)} ({module})" if problems else \
            f"{limits('cuda')} ({module})"
    lines.append(f"cuda    {cuda}")
    return lines


def auto_line() -> str:
    """What ``backend="auto"`` runs per op, on the GPU when there is one, else on the CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen: dict[str, list[str]] = {}
    for op, args in _probe_calls(device).items():
        chosen.setdefault(status.auto_backend(op, *args) or "nothing", []).append(op)
    if len(chosen) == 1:
        return f'backend="auto" runs {next(iter(chosen))} for every op on {device} tensors'
    return f'backend="auto" on {device} tensors: ' + "; ".join(
        f"{be} for {', '.join(ops)}" for be, ops in chosen.items())


def short_report() -> str:
    """The default report: versions, one line per backend, the auto choice."""
    lines = [_versions(), "backends:"]
    lines += [f"  {ln}" for ln in backend_lines()]
    lines.append(auto_line())
    lines.append(ops_library_line())
    lines.append("details (build record, each op's reasons): python -m dtop_kernels.info "
                 "--verbose")
    return "\n".join(lines)


def verbose_report() -> str:
    """Everything: where the package is, the build record, every op's reasons per backend."""
    where = Path(dtop_kernels.__file__).resolve().parent
    lines = [_versions(), f"imported from {where}", _compiled_module(), ops_library_line()]
    info = status.cuda_build_info()
    lines.append("build record: " + ", ".join(
        f"{k}={v}" for k, v in info.items() if k not in ("import_error",) and v not in ("", None)))
    has_gpu = torch.cuda.is_available()
    for device in ["cpu"] + (["cuda"] if has_gpu else []):
        lines.append(f"\nbackends per op, asked about a small float16 call on {device} tensors "
                     f"(1 image of 4 tokens, {PROBE_FEATURES} features, head dim "
                     f"{PROBE_FEATURES}):")
        for op, args in _probe_calls(device).items():
            reasons = status.backend_reasons(op, *args)
            lines.append(f"  {op}: auto -> {status.auto_backend(op, *args) or 'none'}")
            for name in status.BACKENDS:
                r = reasons[name]
                ok = "can run" + (" (unverified on a GPU: explicit backend only)"
                                  if name in status.unverified_backends(op) else "")
                lines.append(f"    {name:6s} " + (ok if not r else "no: " + "; ".join(r)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m dtop_kernels.info",
        description="Say which backend can run here and why the others cannot (one line each); "
                    "--verbose adds the build record and every op's reasons.")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="the compiled module's build record and each op's reasons per backend")
    ap.add_argument("--require-cuda-kernels", action="store_true",
                    help="exit with status 1 unless the compiled CUDA kernels import and have a "
                         "kernel image for this machine's GPU (for scripts that test them)")
    args = ap.parse_args(argv)
    installed = shadowed_install()
    if installed is not None and not os.environ.get("DTOP_INFO_NO_REEXEC"):
        here = Path(dtop_kernels.__file__).resolve().parent
        print(f"note: reporting on the installed package {installed}, not on the source tree "
              f"{here}, which Python imports first from this directory\n", flush=True)
        env = dict(os.environ, DTOP_INFO_NO_REEXEC="1")
        sys.exit(subprocess.run([sys.executable, "-m", "dtop_kernels.info", *sys.argv[1:]],
                                cwd=installed.parent, env=env, check=False).returncode)
    print(verbose_report() if args.verbose else short_report())
    if args.require_cuda_kernels:
        problems = status.cuda_kernel_problems()
        if problems:
            sys.exit("--require-cuda-kernels: the CUDA kernels cannot run here: "
                     + "; ".join(problems))


if __name__ == "__main__":
    main()
