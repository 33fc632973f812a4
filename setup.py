"""Builds the CUDA extension ``dtop_kernels._C`` with CMake (everything else is in pyproject.toml).

The extension is optional. It is built when the installed torch is a CUDA build and nvcc is
found; a CPU build of torch (``torch.version.cuda is None``), whose tensors never reach the CUDA
kernels, skips it by default (``DTOP_FORCE_CUDA_BUILD=1`` builds it anyway, as CI does to keep
compiling the kernels), and so does a missing nvcc or ``DTOP_SKIP_CUDA_BUILD=1``; the package
then installs without it and the pure-PyTorch / Triton backends are used. Either way the
outcome is written to ``dtop_kernels/_build_info.json`` (``python -m dtop_kernels.info`` shows it),
because pip hides build output unless run with ``-v``. Two lines, the start (archs, expected time,
how to skip) and the outcome, also go to the terminal (``/dev/tty``) when there is one, since pip
shows nothing else of a successful build.

Which torch: pip builds in an isolated environment without the user's packages, so the build
asks the target interpreter (``sys.executable -I``, which ignores the isolation's PYTHONPATH)
where torch is and reads its ``torch/version.py`` without importing torch.

The CMake build folder (``build/temp.*/dtop_kernels._C``) is reused between installs, so a second
``pip install`` recompiles only changed sources. What configured it (cmake, ninja, Python,
pybind11, nvcc, archs) is recorded beside it; when that changes (pip's isolated build environment
is a new temporary folder on every install), the CMake cache is redone, and when the compiler or
the archs change, the folder is rebuilt from scratch. A skipped or failed build removes any
``_C`` left in the build folder by an earlier one, so an install never ships a stale module.

Environment:
  DTOP_SKIP_CUDA_BUILD=1           do not build the extension
  DTOP_SKIP_OPS_LIBRARY=1          do not build the op library (csrc/oplib, needed by export)
  CXX                              the C++ compiler of the op library (default: c++)
  DTOP_FORCE_CUDA_BUILD=1          build it even for a CPU build of torch (CI: compile checks)
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
import time
from collections.abc import Mapping
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE = "dtop_kernels"
BUILD_INFO = "_build_info.json"
DEFAULT_ARCHS = "80;90"
# A first build of DEFAULT_ARCHS with 2 jobs, measured: 122 s (2-core AMD EPYC VM shared with
# other work, nvcc 13.0.88, 2026-12-03); the estimate scales it by archs and jobs.
FIRST_BUILD_S = 122


def _env_flag(name: str, env: Mapping[str, str] = os.environ) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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


# Run by the target interpreter: torch's version and CUDA version, read from torch/version.py
# without importing torch (seconds saved; no CUDA initialization). Prints JSON, or null.
_TORCH_PROBE = """
import importlib.util, json, pathlib
spec = importlib.util.find_spec("torch")
found = None
if spec and spec.submodule_search_locations:
    ns = {}
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "version.py"
    exec(compile(path.read_text(), str(path), "exec"), ns)
    found = {"version": ns.get("__version__"), "cuda": ns.get("cuda"), "dir": str(path.parent)}
print(json.dumps(found))
"""


def installed_torch(python: str = sys.executable) -> dict | None:
    """{"version", "cuda"} of the torch that ``python`` imports outside pip's isolated build
    environment (``-I``: no PYTHONPATH, no user site), or None when it has none."""
    try:
        out = subprocess.run([python, "-I", "-c", _TORCH_PROBE], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def skip_reason(env: Mapping[str, str], torch_info: dict | None, nvcc: str | None) -> str | None:
    """Why the CUDA kernels are not built (None: build them), from the environment, the torch
    the package installs into ({"version", "cuda"}, None when not found) and nvcc's path.

    No torch found: built (pip is about to install torch, by default a CUDA build)."""
    if _env_flag("DTOP_SKIP_CUDA_BUILD", env):
        return "DTOP_SKIP_CUDA_BUILD=1"
    if torch_info is not None and not torch_info.get("cuda") \
            and not _env_flag("DTOP_FORCE_CUDA_BUILD", env):
        return (f"torch {torch_info.get('version')} is a CPU build, whose tensors never reach "
                "the CUDA kernels; DTOP_FORCE_CUDA_BUILD=1 builds them anyway")
    if nvcc is None:
        return "no nvcc found on PATH, in CUDA_HOME or CUDACXX"
    return None


def _say(message: str) -> None:
    """Print ``message`` to the build log and, when there is one, to the user's terminal.

    pip shows a build backend's output only with ``-v`` or on failure; the terminal is the one way
    to tell a user, without ``-v``, that a multi-minute compile is running and how it ended."""
    line = f"{PACKAGE}: {message}"
    print(line, flush=True)
    if sys.stdout.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line + "\n")
    except OSError:  # no controlling terminal (CI, IDEs): the build log has it
        pass


def _tool_version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return ""
    return (out.stdout.strip().splitlines() or [""])[0]


def _run_logged(cmd: list[str], tail: int = 60) -> tuple[int, list[str]]:
    """Run ``cmd``, streaming its output to ours; returns (returncode, the last ``tail`` lines)."""
    print("+", shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    last: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        last = (last + [line.rstrip()])[-tail:]
    sys.stdout.flush()
    return proc.wait(), last


def _diagnose(step: str, archs: str, nvcc: str, lines: list[str]) -> str:
    """One sentence naming the likely cause of a failed cmake step, from its last output lines."""
    text = "\n".join(lines)
    unsupported = re.search(r"Unsupported gpu architecture '([^']+)'", text)
    if unsupported or "CMAKE_CUDA_ARCHITECTURES" in text:
        arch = unsupported.group(1) if unsupported else archs
        return (f"nvcc at {nvcc} cannot compile for {arch} (DTOP_CUDA_ARCHS={archs}); "
                "`nvcc --list-gpu-arch` lists what it supports: set DTOP_CUDA_ARCHS to those")
    if "No CMAKE_CUDA_COMPILER could be found" in text or "Failed to detect a default CUDA" in text:
        return f"CMake could not use nvcc at {nvcc} (is the CUDA toolkit complete?)"
    if "pybind11" in text and "Could not find" in text:
        return "CMake could not find pybind11 (pip install pybind11, or let pip's build isolation " \
               "provide it)"
    errors = [ln.strip() for ln in lines if re.search(r"\berror\b", ln, re.IGNORECASE)]
    if step == "build" and errors:
        return f"compiling the kernels failed; first error: {errors[0][:300]}"
    return f"cmake {step} failed (DTOP_CUDA_ARCHS={archs}); the error is in the output above"


def prepare_build_dir(build_dir: Path, key: dict[str, str]) -> None:
    """Keep, reconfigure or wipe ``build_dir`` depending on what configured it last."""
    stamp = build_dir / "dtop_configure.json"
    old = json.loads(stamp.read_text()) if stamp.is_file() else None
    if old == key:
        return
    if old is None or old.get("compiler") != key["compiler"]:
        if build_dir.exists():
            why = ("no record of what configured it" if old is None else
                   f"compiler or archs changed: {old.get('compiler')} -> {key['compiler']}")
            print(f"{PACKAGE}: removing the build folder {build_dir} ({why})", flush=True)
            shutil.rmtree(build_dir)
    else:
        changed = ", ".join(k for k in key if old.get(k) != key[k])
        print(f"{PACKAGE}: reconfiguring {build_dir}: {changed} changed since the last "
              "build (compiled kernels are reused where their commands are unchanged)",
              flush=True)
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
    build_dir.mkdir(parents=True, exist_ok=True)


OPS_LIBRARY = "libdtop_ops.so"
# The stable ABI the op library targets (TORCH_TARGET_VERSION): it loads into this PyTorch and
# every later one that keeps the ABI.
OPS_TARGET = (2, 10)


def ops_library_skip_reason(env: Mapping[str, str], torch_info: dict | None,
                            cxx: str | None) -> str | None:
    """Why the op library is not built (None: build it)."""
    if _env_flag("DTOP_SKIP_OPS_LIBRARY", env):
        return "DTOP_SKIP_OPS_LIBRARY=1"
    if torch_info is None or not torch_info.get("dir"):
        return "torch was not found when the package was built (install torch first)"
    header = Path(torch_info["dir"]) / "include" / "torch" / "csrc" / "stable" / "library.h"
    if not header.is_file():
        return (f"torch {torch_info.get('version')} has no stable-ABI headers ({header}); "
                f"PyTorch >= {OPS_TARGET[0]}.{OPS_TARGET[1]} is needed")
    if cxx is None:
        return "no C++ compiler found ($CXX, c++, g++)"
    return None


def ops_library_command(src: Path, out: Path, torch_dir: Path, cxx: str, version: str,
                        version_script: Path) -> list[str]:
    """The one compile-and-link command of the op library: stable ABI headers only, hidden
    symbols (the version script exports the C function ``dtop_ops_*`` alone), linked to
    libtorch_cpu for the C shim's functions (no rpath: torch has loaded it already wherever the
    library is loaded)."""
    major, minor = OPS_TARGET
    return [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden",
            "-fvisibility-inlines-hidden", f"-Wl,--version-script={version_script}",
            f"-DTORCH_TARGET_VERSION=(((0ULL+{major})<<56)|((0ULL+{minor})<<48))",
            f'-DDTOP_OPS_VERSION="{version}"', "-I", str(torch_dir / "include"), str(src),
            "-L", str(torch_dir / "lib"), "-Wl,--no-as-needed", "-ltorch_cpu", "-o", str(out)]


def _package_version() -> str:
    text = (ROOT / PACKAGE / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    return match.group(1) if match else "0"


def build_ops_library(build_temp: Path, torch_info: dict | None) -> tuple[Path | None, str]:
    """Compile csrc/oplib into ``build_temp``; returns (the library, "") or (None, why not)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    reason = ops_library_skip_reason(os.environ, torch_info, cxx)
    if reason:
        return None, reason
    build_temp.mkdir(parents=True, exist_ok=True)
    script = build_temp / "dtop_ops.map"
    script.write_text("{ global: dtop_ops_*; local: *; };\n")
    out = build_temp / OPS_LIBRARY
    cmd = ops_library_command(ROOT / "csrc" / "oplib" / "dtop_ops.cpp", out,
                              Path(torch_info["dir"]), cxx,
                              f"{_package_version()} torch {torch_info.get('version')}", script)
    rc, tail = _run_logged(cmd)
    if rc != 0:
        errors = [ln for ln in tail if "error" in ln.lower()]
        return None, f"compiling it failed: {(errors or tail or ['?'])[0][:300]}"
    return out, ""


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds csrc/ with CMake + Ninja; skips (with a reason) when it cannot."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.nvcc = _find_nvcc()
        self.torch = installed_torch()
        self.skip_reason = self._skip_reason()
        if self.skip_reason:
            self.extensions = []
        torch_desc = "not found" if self.torch is None else \
            f"{self.torch['version']} (CUDA {self.torch.get('cuda') or 'none'})"
        self.build_info = {"cuda_built": False, "reason": self.skip_reason or "",
                           "archs": "", "nvcc_version": "", "torch": torch_desc}

    def _skip_reason(self) -> str | None:
        reason = skip_reason(os.environ, self.torch, self.nvcc)
        if reason:
            return reason
        for tool in ("cmake", "ninja"):
            if shutil.which(tool) is None:
                return f"{tool} not found on PATH (pip install {tool})"
        try:
            import pybind11  # noqa: F401 - needed by _build_cmake
        except ImportError:
            return ("pybind11 is not importable (pip install pybind11; pip installs it itself "
                    "unless run with --no-build-isolation)")
        return None

    def _package_dirs(self) -> list[Path]:
        """Where the package is assembled: the build folder, and the sources when in place."""
        targets = [Path(self.build_lib) / PACKAGE]
        if self.inplace:  # editable install / build_ext --inplace: next to the sources
            build_py = self.get_finalized_command("build_py")
            targets.append(Path(build_py.get_package_dir(PACKAGE)).resolve())
        return targets

    def run(self) -> None:
        super().run()
        info = self.build_info
        if info["cuda_built"]:
            _say(f"CUDA kernels built for archs {info['archs']} (nvcc {info['nvcc_version']}) "
                 f"in {info.get('seconds', 0):.0f} s")
        else:
            _say(f"CUDA kernels not built: {info['reason']}; the torch (and Triton) backends "
                 "work without them")
        cuda_lib = Path(self.build_temp).resolve() / f"{PACKAGE}._C" / "oplib" / OPS_LIBRARY
        if info["cuda_built"] and cuda_lib.is_file():  # CMake built it with the CUDA kernels
            lib, why = cuda_lib, ""
            info["ops_library_cuda"] = True
        else:
            lib, why = build_ops_library(Path(self.build_temp).resolve() / "dtop_ops",
                                         self.torch)
        info["ops_library"], info["ops_library_reason"] = lib is not None, why
        _say("op library built (export and deployment)" if lib else
             f"op library not built: {why}; export is unavailable, everything else works")
        for folder in self._package_dirs():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "lib").mkdir(exist_ok=True)
            (folder / "lib" / OPS_LIBRARY).unlink(missing_ok=True)  # never a stale one
            if lib is not None:
                shutil.copy2(lib, folder / "lib" / OPS_LIBRARY)
            if not info["cuda_built"]:  # never ship a module left by an earlier build
                for stale in folder.glob("_C.*"):
                    if stale.suffix in (".so", ".pyd") and stale.is_file():
                        print(f"removing {stale} (left by an earlier build)", flush=True)
                        stale.unlink()
            (folder / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")

    def build_extensions(self) -> None:
        archs = _cuda_archs()
        try:
            self.build_info["nvcc_version"] = _nvcc_version(self.nvcc)
            start = time.monotonic()
            for ext in self.extensions:
                self._build_cmake(ext, archs)
        except (OSError, subprocess.CalledProcessError, CUDABuildError) as e:
            if not _env_flag("DTOP_ALLOW_CUDA_BUILD_FAILURE"):
                _say(f"building the CUDA kernels failed: {e}")
                raise CUDABuildError(
                    f"{PACKAGE}: building the CUDA extension failed: {e}. To install without "
                    "the CUDA kernels (torch and Triton backends only), set "
                    "DTOP_SKIP_CUDA_BUILD=1, or DTOP_ALLOW_CUDA_BUILD_FAILURE=1 to fall back "
                    "to that whenever the build fails."
                ) from e
            self.extensions = []
            self.build_info["reason"] = f"build failed: {e}; DTOP_ALLOW_CUDA_BUILD_FAILURE=1"
            return
        self.build_info.update(cuda_built=True, reason="", archs=archs,
                               seconds=round(time.monotonic() - start, 1))

    def _configure_key(self, archs: str) -> dict[str, str]:
        """What a CMake cache depends on. ``compiler`` entries invalidate compiled objects too."""
        import pybind11

        return {
            "source": str(ROOT),
            "cmake": f"{shutil.which('cmake')} ({_tool_version('cmake')})",
            "ninja": f"{shutil.which('ninja')} ({_tool_version('ninja')})",
            "python": sys.executable,
            "pybind11": pybind11.get_cmake_dir(),
            "compiler": f"{self.nvcc} ({self.build_info['nvcc_version']}), archs {archs}",
        }

    def _build_cmake(self, ext: Extension, archs: str) -> None:
        import pybind11

        ext_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        key = self._configure_key(archs)
        prepare_build_dir(build_dir, key)
        (build_dir / "oplib" / OPS_LIBRARY).unlink(missing_ok=True)  # this build makes it anew
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        n_archs = len(archs.split(";"))
        minutes = FIRST_BUILD_S * n_archs / 2 * 2 / max(1, min(int(jobs), 7)) / 60
        _say(f"compiling the CUDA kernels for archs {archs} with nvcc "
             f"{self.build_info['nvcc_version']} and {jobs} jobs (about {max(1, round(minutes))}"
             " min on a first build; DTOP_SKIP_CUDA_BUILD=1 skips them, DTOP_CUDA_ARCHS=<one "
             "arch> is faster)")
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_MAKE_PROGRAM={shutil.which('ninja')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DCMAKE_CUDA_COMPILER={self.nvcc}",
            f"-DDTOP_CUDA_ARCHS={archs}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        if self.torch and self.torch.get("dir") and not ops_library_skip_reason(
                os.environ, self.torch, "c++"):  # the op library's CUDA implementations
            version = f"{_package_version()} torch {self.torch.get('version')}"
            configure += [f"-DDTOP_TORCH_DIR={self.torch['dir']}",
                          f"-DDTOP_OPS_VERSION={version}"]
        build = ["cmake", "--build", str(build_dir), "-j", jobs]
        for step, cmd in (("configure", configure), ("build", build)):
            rc, tail = _run_logged(cmd)
            if rc != 0:
                raise CUDABuildError(_diagnose(step, archs, self.nvcc, tail))
            if step == "configure":
                (build_dir / "dtop_configure.json").write_text(json.dumps(key, indent=2) + "\n")


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import its helpers
    setup(
        ext_modules=[CMakeExtension(f"{PACKAGE}._C")],
        cmdclass={"build_ext": CMakeBuild},
    )
