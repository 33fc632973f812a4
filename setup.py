"""Builds the CUDA extension ``dtop_kernels._C`` with CMake (everything else is in pyproject.toml).

The extension is optional: without a CUDA compiler (or with ``DTOP_SKIP_CUDA_BUILD=1``) the
package installs without it and the pure-PyTorch / Triton backends are used. Either way the
outcome is written to ``dtop_kernels/_build_info.json`` (``python -m dtop_kernels.info`` shows it),
because pip hides build output unless run with ``-v``.

Environment:
  DTOP_SKIP_CUDA_BUILD=1           do not build the extension
  DTOP_ALLOW_CUDA_BUILD_FAILURE=1  install without the extension if its compilation fails
  DTOP_CUDA_ARCHS                  CUDA architectures in CMake syntax (default "80;90")
  MAX_JOBS                         parallel compile jobs
  CUDACXX / CUDA_HOME              where to find nvcc when it is not on PATH
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE = "dtop_kernels"
BUILD_INFO = "_build_info.json"
DEFAULT_ARCHS = "80;90"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc() -> str | None:
    """$CUDACXX, else nvcc on PATH, else $CUDA_HOME/bin/nvcc."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    return match.group(1) if match else out.strip().splitlines()[-1]


def _cuda_archs() -> str:
    """DTOP_CUDA_ARCHS normalized to a CMake list; commas and spaces are accepted too."""
    archs = [a for a in re.split(r"[;,\s]+", os.environ.get("DTOP_CUDA_ARCHS", "")) if a]
    return ";".join(archs) or DEFAULT_ARCHS


class CUDABuildError(RuntimeError):
    pass


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds csrc/ with CMake + Ninja; skips (with a reason) when it cannot."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.nvcc = _find_nvcc()
        self.skip_reason = self._skip_reason()
        if self.skip_reason:
            self.extensions = []
        self.build_info = {"cuda_built": False, "reason": self.skip_reason or "",
                           "archs": "", "nvcc_version": ""}

    def _skip_reason(self) -> str | None:
        if _env_flag("DTOP_SKIP_CUDA_BUILD"):
            return "DTOP_SKIP_CUDA_BUILD=1"
        if self.nvcc is None:
            return "no nvcc found on PATH, in CUDA_HOME or CUDACXX"
        for tool in ("cmake", "ninja"):
            if shutil.which(tool) is None:
                return f"{tool} not found on PATH (pip install {tool})"
        return None

    def run(self) -> None:
        super().run()
        info = self.build_info
        if info["cuda_built"]:
            print(f"{PACKAGE}: CUDA kernels built for archs {info['archs']} "
                  f"(nvcc {info['nvcc_version']})", flush=True)
        else:
            print(f"{PACKAGE}: CUDA kernels skipped ({info['reason']})", flush=True)
        targets = [Path(self.build_lib) / PACKAGE]
        if self.inplace:  # editable install / build_ext --inplace: next to the sources
            build_py = self.get_finalized_command("build_py")
            targets.append(Path(build_py.get_package_dir(PACKAGE)).resolve())
        for folder in targets:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")

    def build_extensions(self) -> None:
        archs = _cuda_archs()
        try:
            self.build_info["nvcc_version"] = _nvcc_version(self.nvcc)
            for ext in self.extensions:
                self._build_cmake(ext, archs)
        except (OSError, subprocess.CalledProcessError, CUDABuildError) as e:
            if not _env_flag("DTOP_ALLOW_CUDA_BUILD_FAILURE"):
                raise CUDABuildError(
                    f"{PACKAGE}: building the CUDA extension failed ({e}); see the output above. "
                    "Set DTOP_SKIP_CUDA_BUILD=1 to install without the CUDA kernels, or "
                    "DTOP_ALLOW_CUDA_BUILD_FAILURE=1 to fall back to that on failure."
                ) from e
            self.extensions = []
            self.build_info["reason"] = f"build failed: {e}; DTOP_ALLOW_CUDA_BUILD_FAILURE=1"
            return
        self.build_info.update(cuda_built=True, reason="", archs=archs)

    def _build_cmake(self, ext: Extension, archs: str) -> None:
        import pybind11

        ext_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DCMAKE_CUDA_COMPILER={self.nvcc}",
            f"-DDTOP_CUDA_ARCHS={archs}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        build = ["cmake", "--build", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            build += ["-j", os.environ["MAX_JOBS"]]
        for step, cmd in (("configure", configure), ("build", build)):
            print("+", shlex.join(cmd), flush=True)
            if subprocess.run(cmd, check=False).returncode != 0:
                raise CUDABuildError(f"cmake {step} failed with DTOP_CUDA_ARCHS={archs}")


setup(
    ext_modules=[CMakeExtension(f"{PACKAGE}._C")],
    cmdclass={"build_ext": CMakeBuild},
)
