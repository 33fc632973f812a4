"""One command answers the GPU questions: build, GPU tests, sanitizers, host syncs, benchmarks.

    python3 tests/gpu_check.py --out OUT            # on a GPU machine, from the repo root
    python tests/gpu_check.py --dry-run --out OUT   # anywhere: the same plumbing, CPU commands

Steps run one after another in the order of their value (the two sanitizers beside the GPU
tests: nothing there is timed), each in a subprocess with its own time limit, and the run
continues past a failed step, except the preflight: when the machine (offline, no package
registry) lacks a tool or package the build or the tests need, it names all of them in one line
and the run stops there. Every step's limit is cut to what is left of ``--deadline`` (default
450 s: with the machine's start, within the 8-minute target), keeping a reserve for writing the
results; each step sees the end of its own limit as ``DTOP_STEP_DEADLINE`` (seconds since the
epoch). OUT gets at most 8 files:

    summary.json     device, driver, torch, triton, CUDA, date, commit; per step status, seconds,
                     return code, limit and expected GPU seconds
    gpu_check.log    every step's command and output, in step order
    ops.json         benchmarks/ops.py --json
    latency.json     benchmarks/latency.py --res 512 --batch 1 8 --compile dense --json

and the short summary is printed last. ``--dry-run`` builds the same commands but runs their
CPU stand-ins (argument parsing, test collection, no build), so CI catches a renamed flag, test
marker or script path (tests/test_gpu_check.py).

- preflight: cmake (>= 3.24), ninja, nvcc, compute-sanitizer, and the Python packages of the
  build (setuptools with bdist_wheel, pybind11) and of the tests (pytest, pytest-xdist,
  hypothesis, Pillow, numpy, triton).
- gpu tests: every test a GPU un-skips, not only ``-m gpu``: the whole suite less the host-only
  files (``HOST_ONLY``), ordered by value (tests/conftest.py under ``DTOP_STEP_DEADLINE``: the
  GPU-marked tests, then those parametrized with the cuda backend, then Triton's, then bf16,
  then the rest); a test that would start within ``TEARDOWN_S`` (tests/conftest.py) of the
  step's end is skipped, so that pytest still reports what failed.
- memcheck / racecheck: with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1``, so that an access past a
  tensor is not hidden inside one of the caching allocator's blocks.

Expected GPU seconds per step (``EXPECTED``), for one H100 / H200 host (16 cores); derived on a
2-core CPU machine without a GPU, so unverified:

- build: nvcc for sm_90 alone took 88 s here on 2 cores (9 units; slowest select.cu 39 s
  with CUB, bindings.cpp 29 s, layernorm.cu 28 s; link 11 s). On 16 cores the units compile at
  once: ~40 s for the slowest plus the link, ~10 s of pip and cmake: ~60 s.
- gpu tests: bounded by their limit; the GPU-marked tests alone touch ~130 Triton variants
  (3 dtypes x the attention head dims x fwd / dK,dV / dQ, the stage's LayerNorm, 5 linear
  epilogues, gather / scatter, selection) at ~0.5 s each (tests/compile_kernels.py compiles 60
  sm_90 variants in 145 s on one busy core here) over 8 workers, some compiled twice, then
  the float64 references and 8 worker start-ups (torch import, CUDA context).
- memcheck / racecheck: tests/sanitize_cuda.py runs ~40 small launches; each sanitizer start and
  instrumentation of the loaded kernels ~20 s, racecheck slower per launch, and every
  allocation a cudaMalloc without the caching allocator.
- syncs: a tiny ViT-DToP packed forward per backend, ~20 Triton variants.
- ops: ViT-B and ViT-L shapes at batch 1 and 8; ~50 Triton variants, a FlexAttention compile
  per shape, 50 timed calls per implementation.
- latency: torch.compile of the dense ViT-B only (``--compile dense``: the packed compile, a graph
  per stage and batch, would not fit), end to end and to the logits (two graphs, ~60 s of
  inductor compile each on 16 cores), CUDA graph captures (dense and per packed backend), then
  30 timed forwards per row and variant at batch 1 and 8. Last: it takes what is left.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILES = 8
DEADLINE_S = 450  # every step, within 8 minutes of device time with the machine's start
RESERVE_S = 15  # kept back from the deadline for the summary (and a stopped step's grace)
GRACE_S = 5  # a step over its limit gets SIGTERM, then SIGKILL this much later
LOG = "gpu_check.log"
# Test files a GPU does not change (host-side checks, CPU-only subprocesses); the benchmarks
# run as steps of their own.
HOST_ONLY = ("test_build.py", "test_readme.py", "test_gpu_check.py", "test_triton_compile.py",
             "test_benchmarks.py", "test_model_ddp.py")
# Python modules the build and the tests import -> the distribution that provides them.
MODULES = {"setuptools": "setuptools", "pybind11": "pybind11", "torch": "torch",
           "numpy": "numpy", "triton": "triton", "pytest": "pytest", "xdist": "pytest-xdist",
           "hypothesis": "hypothesis", "PIL": "Pillow"}
TOOLS = ("cmake", "ninja", "nvcc", "compute-sanitizer")
CMAKE_MIN = (3, 24)  # CMakeLists.txt's cmake_minimum_required

# Steps in order of value, the expected seconds on one H100 / H200 host (module docstring) and
# each step's own limit (cut to what is left of the deadline).
EXPECTED = {"preflight": 3, "build": 60, "info": 5, "gpu tests": 150, "memcheck": 60,
            "racecheck": 70, "syncs": 20, "ops": 60, "latency": 120}
LIMIT = {"preflight": 30, "build": 150, "info": 30, "gpu tests": 170, "memcheck": 170,
         "racecheck": 170, "syncs": 45, "ops": 90, "latency": 240}


@dataclass
class Step:
    name: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    beside_next: bool = False  # starts together with the next step
    stop_on_failure: bool = False  # the steps after it are skipped when it fails
    status: str = "not run"
    seconds: float = 0.0
    rc: int | None = None
    limit: float = 0.0
    output: str = ""


def _py() -> str:
    return sys.executable


def build_steps(out: Path, cc: tuple[int, int] | None, dry: bool, workers: int) -> list[Step]:
    """The steps for a GPU of compute capability ``cc``; their CPU stand-ins when ``dry``."""
    arch = f"{cc[0]}{cc[1]}" if cc else "90"
    py = _py()
    me = str(Path(__file__).resolve())
    ops, lat = str(out / "ops.json"), str(out / "latency.json")
    # -P: the source tree (no _C) must not shadow the package the build step installed.
    pytest = [py, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "tests"]
    pytest += [f"--ignore=tests/{f}" for f in HOST_ONLY]
    xdist = ["-n", str(workers), "--dist", "load"]
    sanitize = [py, "tests/sanitize_cuda.py"]
    memcheck = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1"] + sanitize
    racecheck = (["compute-sanitizer", "--tool", "racecheck", "--error-exitcode", "1"]
                 + sanitize + ["--only", "attention", "linear"])
    no_cache = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}  # out-of-bounds inside a cached block
    build = [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q", "."]
    steps = [
        Step("preflight", [py, me, "--preflight"], stop_on_failure=True),
        Step("build", build, env={"DTOP_CUDA_ARCHS": arch, "MAX_JOBS": str(os.cpu_count())}),
        # fails unless the CUDA kernels were built and can run on this GPU: a build that
        # skipped them would otherwise let every CUDA test skip quietly
        Step("info", [py, "-P", "-m", "dtop_kernels.info", "--require-cuda-kernels"]),
        Step("gpu tests", pytest + xdist, beside_next=True),
        Step("memcheck", memcheck, env=no_cache, beside_next=True),
        Step("racecheck", racecheck, env=no_cache),
        Step("syncs", [py, me, "--sync-check"]),
        Step("ops", [py, "benchmarks/ops.py", "--json", ops]),
        Step("latency", [py, "benchmarks/latency.py", "--res", "512", "--batch", "1", "8",
                         "--compile", "dense", "--quiet", "--json", lat]),
    ]
    if dry:  # the same scripts and arguments where a CPU can take them
        stand_in = {
            "preflight": [py, me, "--preflight", "--device", "cpu"],
            "build": [py, "setup.py", "--version"],
            "info": [py, "-m", "dtop_kernels.info"],
            "gpu tests": pytest + ["--collect-only"],
            "memcheck": sanitize + ["--help"],
            "racecheck": sanitize + ["--help"],
            "syncs": [py, me, "--sync-check", "--device", "cpu"],
            "ops": [py, "benchmarks/ops.py", "--help"],
            "latency": [py, "benchmarks/latency.py", "--help"],
        }
        for s in steps:
            if s.name in stand_in:
                s.cmd = stand_in[s.name]
            s.env = {"PYTHONPATH": str(ROOT)}  # nothing is installed: the source tree
    return steps


def _version(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)", text)
    return (int(m[1]), int(m[2])) if m else ()


def missing() -> list[str]:
    """What the build and the tests need and this machine lacks (empty when nothing)."""
    out = []
    for tool in TOOLS:
        path = shutil.which(tool) or (os.environ.get("CUDACXX") if tool == "nvcc" else None)
        if tool == "nvcc" and not path and os.environ.get("CUDA_HOME"):
            path = shutil.which(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
        if not path:
            out.append(tool)
        elif tool == "cmake":
            got = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 check=False).stdout
            if _version(got) < CMAKE_MIN:
                out.append(f"cmake >= {'.'.join(map(str, CMAKE_MIN))} (found "
                           f"{'.'.join(map(str, _version(got))) or 'unknown'})")
    out += [dist for mod, dist in MODULES.items() if importlib.util.find_spec(mod) is None]
    if "setuptools" not in out and importlib.util.find_spec("wheel") is None:
        import setuptools

        if _version(setuptools.__version__) < (70, 1):  # bdist_wheel moved into setuptools
            out.append("wheel (or setuptools >= 70.1)")
    return out


def preflight(device: str) -> int:
    """One line naming everything missing; fails on a GPU machine when anything is (on a CPU,
    the dry run, only the line)."""
    lacking = missing()
    if not lacking:
        print(f"preflight: {', '.join(TOOLS)} and {', '.join(MODULES.values())} present")
        return 0
    print(f"preflight: MISSING {', '.join(lacking)} (no package registry here: carry wheels "
          "with the repo and pip install --no-index --find-links DIR; tools on PATH)")
    return 1 if device == "cuda" else 0


def _kill(proc: subprocess.Popen) -> None:
    """Ends the step's whole process group (the step's children too): SIGTERM, on which the
    benchmarks write the rows measured so far, then SIGKILL after ``GRACE_S``."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if wait is not None:
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                pass


def run_steps(steps: list[Step], deadline_s: float, log_dir: Path) -> None:
    """Runs the steps in order (a ``beside_next`` step together with the next one), each
    time-boxed to min(its limit, what is left of the deadline); never raises for a step. A failed
    ``stop_on_failure`` step skips the rest."""
    t_end = time.monotonic() + deadline_s - RESERVE_S
    i = 0
    stopped = ""
    while i < len(steps):
        group = [steps[i]]
        while group[-1].beside_next and i + len(group) < len(steps):
            group.append(steps[i + len(group)])
        i += len(group)
        running = []
        for s in group:
            s.limit = max(0.0, min(LIMIT.get(s.name, 60), t_end - time.monotonic()))
            if stopped:
                s.status = f"skipped: {stopped} failed"
                continue
            if s.limit < 1:
                s.status = "skipped: no time left"
                continue
            f = open(log_dir / f"{len(running)}-{s.name.replace(' ', '_')}.txt", "w+")  # noqa: SIM115
            env = os.environ | s.env | {"DTOP_STEP_DEADLINE": f"{time.time() + s.limit:.3f}"}
            t0 = time.monotonic()
            try:
                proc = subprocess.Popen(s.cmd, cwd=ROOT, env=env, stdout=f,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                s.status, s.output = "failed", f"could not start: {e}"
                f.close()
                continue
            running.append((s, proc, f, t0))
        for s, proc, f, t0 in running:
            try:
                s.rc = proc.wait(timeout=max(0.0, t0 + s.limit - time.monotonic()))
                s.status = "ok" if s.rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                _kill(proc)
                s.rc = proc.wait()
                s.status = f"timeout after {s.limit:.0f} s"
            s.seconds = time.monotonic() - t0
            f.seek(0)
            s.output = f.read()
            f.close()
        stopped = stopped or next((s.name for s in group if s.stop_on_failure
                                   and s.status != "ok"), "")


def environment(cc: tuple[int, int] | None) -> dict:
    """Device, driver, torch, triton, CUDA, date, commit: what goes beside every figure."""
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as e:
        env["triton"] = f"unavailable: {e}"
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                         capture_output=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           text=True, capture_output=True, check=False)
    env["commit"] = (git.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")
    if cc:
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = f"{cc[0]}.{cc[1]}"
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                               text=True, capture_output=True, check=False, timeout=30)
            env["driver"] = q.stdout.strip().splitlines()[0] if q.stdout.strip() else "unknown"
    else:
        env["device"] = "none (dry run)"
    return env


def sync_check(device: str) -> int:
    """Packed forward of a tiny ViT-DToP at fixed capacity on each backend that can run (the
    torch backend with PyTorch's varlen attention), after one warm-up, with torch's sync debug
    mode set to "error": any host synchronization fails the step."""
    import torch

    import dtop_kernels
    from dtop_kernels import BackendError
    from dtop_kernels.models import vit_dtop_tiny
    from dtop_kernels.models.synthetic import make_heads_confident_, synthetic_images

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = make_heads_confident_(vit_dtop_tiny(num_classes=5, threshold=0.5))
    model = model.to(device, dtype).eval()
    model.tighten = False  # bounds stay on the host: tightening is a sync by design
    img = synthetic_images(2, 128, 96, dtype=dtype).to(device)
    print(f"dtop_kernels from {Path(dtop_kernels.__file__).parent}")
    bad = 0
    # On a CPU (the dry run) only the plumbing runs, on the reference backend.
    for backend in ("torch", "triton", "cuda") if device == "cuda" else ("torch",):
        try:
            with torch.no_grad():
                model(img, mode="packed", backend=backend)  # warm-up: compiles, caches
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    model(img, mode="packed", backend=backend)
                finally:
                    if device == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
            print(f"{backend}: packed forward without host syncs")
        except BackendError as e:
            print(f"{backend}: cannot run here ({str(e).splitlines()[0]})")
        except RuntimeError as e:
            bad += 1
            print(f"{backend}: HOST SYNC or error in the packed forward: {e}")
    return 1 if bad else 0


def write_results(out: Path, steps: list[Step], env: dict, total_s: float) -> dict:
    with open(out / LOG, "w") as f:
        f.writelines(f"===== {s.name}: {s.status} ({s.seconds:.1f} s, rc {s.rc})\n"
                    f"$ {' '.join(s.cmd)}\n{s.output}\n" for s in steps)
    files = sorted(p.name for p in out.iterdir())
    summary = {
        "environment": env,
        "total_seconds": round(total_s, 1),
        "steps": [{"name": s.name, "status": s.status, "seconds": round(s.seconds, 1),
                   "rc": s.rc, "limit_seconds": round(s.limit), "expected_gpu_seconds":
                   EXPECTED.get(s.name), "command": s.cmd} for s in steps],
        "files": files + ["summary.json"],
    }
    if len(summary["files"]) > MAX_FILES:
        summary["error"] = f"{len(summary['files'])} files in {out} (at most {MAX_FILES})"
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="results folder (created; must be empty)")
    p.add_argument("--dry-run", action="store_true", help="CPU stand-ins of every step")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for all steps")
    p.add_argument("--workers", type=int, default=8, help="pytest-xdist workers")
    p.add_argument("--sync-check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sync_check:
        return sync_check(args.device)
    if args.preflight:
        return preflight(args.device)
    if args.out is None:
        p.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    if any(args.out.iterdir()):
        p.error(f"--out {args.out} is not empty: give a new folder")
    t0 = time.monotonic()
    cc = None
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device visible to torch; use --dry-run on a CPU machine")
        cc = torch.cuda.get_device_capability()
    steps = build_steps(args.out.resolve(), cc, args.dry_run, args.workers)
    env = environment(cc)
    # Triton's own cache (~/.triton/cache) is kept: a rerun on the same machine recompiles
    # only what changed.
    with tempfile.TemporaryDirectory() as tmp:
        run_steps(steps, args.deadline, Path(tmp))
    summary = write_results(args.out, steps, env, time.monotonic() - t0)
    print(f"\n{env.get('device')} | torch {env['torch']} | triton {env['triton']} | "
          f"CUDA {env['cuda']} | driver {env.get('driver', '-')} | {env['commit']}")
    for s in steps:
        print(f"  {s.name:10s} {s.status:28s} {s.seconds:6.1f} s  (expected ~{EXPECTED[s.name]}"
              f" s on a GPU, limit {s.limit:.0f} s)")
    for s in steps:
        if s.stop_on_failure and s.status != "ok":  # what to fix before the rerun
            print((s.output.strip().splitlines() or [s.status])[-1])
    print(f"total {summary['total_seconds']:.0f} s; results in {args.out}"
          + (f"; {summary['error']}" if "error" in summary else ""))
    ok = all(s.status == "ok" for s in steps) and "error" not in summary
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
