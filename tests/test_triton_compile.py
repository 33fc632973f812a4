"""Every Triton kernel compiles for sm_80 and sm_90 with its GPU launch settings, and every
kernel (Triton and csrc/*.cu) passes the static resource gate: no spill, shared memory within the
architecture's limit (no GPU needed): tests/compile_kernels.py, run without the interpreter in
subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parent / "compile_kernels.py"
sys.path.insert(0, str(SCRIPT.parent))
import compile_kernels as ck


def _env() -> dict[str, str]:
    import dtop_kernels

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # The script imports the same dtop_kernels as this test (installed, or this checkout).
    where = str(Path(dtop_kernels.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (where, env.get("PYTHONPATH")) if p)
    return env


# The two compiling tests are first and last in this file, so that pytest-xdist's first
# distribution gives them to different workers.
def test_triton_kernels_compile_for_gpus_within_the_resource_gate():
    procs = {arch: subprocess.Popen([sys.executable, str(SCRIPT), "--arch", arch, "--gate"],
                                    env=_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for arch in ("80", "90")}
    for arch, proc in procs.items():
        out, _ = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"sm_{arch} compile or gate failed:\n{out[-4000:]}"
        assert "compiled" in out and "resource gate: 0 problems" in out


def _usage(**kw) -> ck.Usage:
    base = {"kernel": "_k", "arch": 80, "case": "vit-b fp16", "head_dim": "64", "regs": 128,
            "stack": 0, "spill_bytes": 0, "smem": 1024, "mma": "mma.sync"}
    return ck.Usage(**(base | kw))


def test_gate_fails_on_spills_and_shared_memory_above_the_limit():
    assert _usage().problems() == []
    assert "spills" in _usage(spill_bytes=8, stack=40).problems()[0]
    assert "spills" in _usage(stack=40).problems()[0]
    assert _usage(smem=163 * 1024).problems() == []
    assert "shared memory" in _usage(smem=163 * 1024 + 1).problems()[0]
    assert _usage(arch=90, smem=227 * 1024).problems() == []
    assert "shared memory" in _usage(case="csrc/linear.cu", smem=48 * 1024 + 1).problems()[0]
    assert _usage(case="vit-b fp32", spill_bytes=8, gated=False).problems() == []


def test_resource_table_lists_every_figure():
    table = ck.markdown([_usage(), _usage(arch=90, mma="wgmma", spill_bytes=4)], "date; versions")
    assert "Compiled on date; versions." in table
    head, _, first, second = table.splitlines()[-4:]
    assert all(w in head for w in ("kernel", "arch", "head dim", "registers", "spill", "stack",
                                   "shared", "mma", "gate"))
    assert "| sm_80 |" in first and first.endswith("| pass |")
    assert "| sm_90 |" in second and "wgmma" in second and "spills" in second


def test_cuda_kernels_within_the_resource_gate():
    if not (os.environ.get("CUDACXX") or shutil.which("nvcc")):
        pytest.skip("no nvcc: the CUDA kernels are not compiled here")
    # The built extension's kernels when it is there and current (CI has just built it for
    # sm_80 and sm_90: what ships is what is gated, without compiling it twice); else nvcc.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--kernels", "cuda", "--arch", "80",
                           "--arch", "90", "--gate", "--jobs", "2", "--built"], env=_env(),
                          capture_output=True, text=True, timeout=1800, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"CUDA compile or gate failed:\n{out[-4000:]}"
    assert "resource gate: 0 problems" in out
    import dtop_kernels

    built = sorted(Path(dtop_kernels.__file__).resolve().parent.glob("_C*.so"))
    newest = max(f.stat().st_mtime for f in ck.CSRC.rglob("*") if f.is_file())
    if built and built[0].stat().st_mtime >= newest:
        assert f"read from the built module {built[0]}" in out
    else:
        assert "compiling csrc/ with nvcc" in out
