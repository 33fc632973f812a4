"""Every Triton kernel compiles for sm_80 and sm_90 with its GPU launch settings (no GPU
needed): tests/compile_kernels.py, run without the interpreter in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parent / "compile_kernels.py"


def test_triton_kernels_compile_for_gpus():
    import dtop_kernels

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # The script imports the same dtop_kernels as this test (installed, or this checkout).
    where = str(Path(dtop_kernels.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (where, env.get("PYTHONPATH")) if p)
    procs = {arch: subprocess.Popen([sys.executable, str(SCRIPT), "--arch", arch], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for arch in ("80", "90")}
    for arch, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sm_{arch} compile failed:\n{out[-4000:]}"
        assert "compiled" in out
