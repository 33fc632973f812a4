"""Shared benchmark helpers: environment header, timing, tables, JSON output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _git_commit() -> str:
    """Short commit of this checkout, "+dirty" when dtop_kernels/ or csrc/ have uncommitted
    changes; "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "dtop_kernels", "csrc")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def environment(dtype: torch.dtype, device: torch.device) -> dict:
    """Device, versions and date, printed above every table and stored with every result."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional
        triton_version = "not installed"
    import dtop_kernels

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, "
        threads = torch.get_num_threads()
        name += f"{threads} thread{'s' if threads != 1 else ''})"
    env = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "dtop_kernels": dtop_kernels.__version__,
        "commit": _git_commit(),
        "cuda_ext_built": bool(dtop_kernels.cuda_build_info().get("cuda_built")),
        "dtype": str(dtype).replace("torch.", ""),
        "date": _dt.date.today().isoformat(),
    }
    if device.type != "cuda":
        # glibc malloc settings change CPU timings (page faults on fresh large buffers)
        tuned = sorted((k, v) for k, v in os.environ.items()
                       if k.startswith("MALLOC_") or k == "LD_PRELOAD")
        env["malloc"] = ", ".join(f"{k}={v}" for k, v in tuned) or "default"
    return env


def header(env: dict) -> str:
    return " | ".join(f"{k}: {v}" for k, v in env.items())


def _call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call. CUDA: events around it; CPU: perf_counter."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _stats(times: list[float]) -> dict:
    times = sorted(times)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"ms": statistics.median(times), "p20": q[0], "p80": q[3], "repeats": len(times),
            "samples_ms": times}


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3,
            repeats: int = 10) -> dict:
    """Median / p20 / p80 milliseconds. CUDA: events around each call; CPU: perf_counter."""
    return time_interleaved([fn], device, warmup, repeats)[0]


def time_interleaved(fns: Sequence[Callable[[], object]], device: torch.device,
                     warmup: int = 3, repeats: int = 10) -> list[dict]:
    """:func:`time_fn` for several functions called round-robin (``warmup`` rounds, then
    ``repeats`` timed rounds of one call each), so that a change in machine load (a shared CPU,
    GPU clocks) hits every function alike instead of whichever ran at that moment."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(times, fns):
            t.append(_call_ms(fn, device))
    return [_stats(t) for t in times]


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, title, format spec). Missing values print as '-'."""
    cells = [[title for _, title, _ in columns]]
    for r in rows:
        line = []
        for key, _, spec in columns:
            v = r.get(key)
            line.append("-" if v is None else (format(v, spec) if spec else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, c in enumerate(cells):
        out.append("  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in
                             enumerate(zip(c, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: str | Path, env: dict, rows: list[dict], **extra) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, **extra, "rows": rows}, indent=2) + "\n")
    return path


class Stopped(BaseException):  # noqa: N818 - a stop, not an error of the benchmark
    """Raised in the main thread when the process receives SIGTERM (:func:`stop_on_sigterm`).
    A BaseException, like KeyboardInterrupt: the benchmarks' ``except Exception`` (a row that
    fails is recorded, the others go on) must not take it for a failed row."""


def stop_on_sigterm() -> None:
    """Turn SIGTERM (a time limit ending the run, e.g. tests/gpu_check.py's) into
    :class:`Stopped`, so that a benchmark can still write the rows it has measured."""
    import signal

    def stop(signum, frame):  # noqa: ARG001
        raise Stopped("stopped by SIGTERM before the end (a time limit?): the rows measured so "
                      "far are kept")

    signal.signal(signal.SIGTERM, stop)


def write_stopped_json(path: str | None, name: str, partial: dict, stop: Stopped,
                       **extra) -> None:
    """For a run ended by :class:`Stopped` with ``--json`` (``path``; "" for the default
    name): the rows measured so far (``partial``: env, rows, notes), marked incomplete."""
    if path is None or not partial.get("env"):
        return
    rows = partial.get("rows", [])
    out = write_json(path or default_json_path(partial["env"], name), partial["env"], rows,
                     notes=[*partial.get("notes", []), str(stop)], complete=False, **extra)
    print(f"wrote {out} ({len(rows)} rows)", file=sys.stderr)


def default_json_path(env: dict, name: str) -> Path:
    dev = "".join(ch if ch.isalnum() else "-" for ch in env["device"].lower()).strip("-")
    while "--" in dev:
        dev = dev.replace("--", "-")
    return RESULTS / f"{name}-{dev}-{env['date'].replace('-', '')}.json"
