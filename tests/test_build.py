"""The build's bookkeeping (setup.py), without compiling anything: when the CMake build folder is
kept, reconfigured or wiped, and which cause a failed build names. The real sequence of
installs (``pip install .``, then ``pip install ".[test]"``, skip, arch change) runs in CI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    if not (ROOT / "setup.py").is_file():
        pytest.skip("no setup.py next to the tests (not a source checkout)")
    pytest.importorskip("setuptools")
    spec = importlib.util.spec_from_file_location("dtop_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: setup() does not run
    return mod


KEY = {"source": "/src", "cmake": "/tmp/env1/bin/cmake (cmake version 4.1)",
       "ninja": "/tmp/env1/bin/ninja (1.13)", "python": "/venv/bin/python",
       "pybind11": "/tmp/env1/pybind11/share/cmake", "compiler": "/cuda/bin/nvcc (13.0), archs 80"}


def _fake_build(folder: Path, key: dict | None) -> None:
    (folder / "CMakeFiles" / "k.dir").mkdir(parents=True)
    (folder / "CMakeCache.txt").write_text("CMAKE_MAKE_PROGRAM=/tmp/env1/bin/ninja\n")
    (folder / "CMakeFiles" / "k.dir" / "attention.cu.o").write_text("object")
    if key is not None:
        (folder / "dtop_configure.json").write_text(json.dumps(key))


def test_same_environment_keeps_everything(setup_py, tmp_path: Path) -> None:
    _fake_build(tmp_path / "b", KEY)
    setup_py.prepare_build_dir(tmp_path / "b", dict(KEY))
    assert (tmp_path / "b" / "CMakeCache.txt").is_file()
    assert (tmp_path / "b" / "CMakeFiles" / "k.dir" / "attention.cu.o").is_file()


def test_new_build_environment_redoes_the_cache_keeps_objects(setup_py, tmp_path: Path) -> None:
    """pip's isolated build environment moves cmake/ninja/pybind11 on every install: the cache
    that records the old paths goes, the compiled kernels stay for ninja to reuse."""
    _fake_build(tmp_path / "b", KEY)
    new = dict(KEY, ninja="/tmp/env2/bin/ninja (1.13)", cmake="/tmp/env2/bin/cmake (4.1)")
    setup_py.prepare_build_dir(tmp_path / "b", new)
    assert not (tmp_path / "b" / "CMakeCache.txt").exists()
    assert (tmp_path / "b" / "CMakeFiles" / "k.dir" / "attention.cu.o").is_file()


@pytest.mark.parametrize("change", [
    pytest.param({"compiler": "/cuda/bin/nvcc (13.0), archs 90a"}, id="archs"),
    pytest.param({"compiler": "/cuda-12/bin/nvcc (12.8), archs 80"}, id="nvcc"),
    pytest.param(None, id="unrecorded-build-folder"),
])
def test_compiler_change_or_unknown_folder_starts_over(setup_py, tmp_path: Path, change) -> None:
    _fake_build(tmp_path / "b", None if change is None else KEY)
    setup_py.prepare_build_dir(tmp_path / "b", dict(KEY, **(change or {})))
    assert (tmp_path / "b").is_dir()
    assert list((tmp_path / "b").iterdir()) == []


@pytest.mark.parametrize(("lines", "step", "expect"), [
    pytest.param(["nvcc fatal   : Unsupported gpu architecture 'compute_20'"], "configure",
                 "cannot compile for compute_20", id="arch"),
    pytest.param(["csrc/linear.cu(12): error: identifier \"foo\" is undefined"], "build",
                 "first error: csrc/linear.cu(12): error", id="compile-error"),
    pytest.param(["something else"], "configure", "cmake configure failed", id="other"),
])
def test_build_errors_name_their_cause(setup_py, lines, step, expect) -> None:
    assert expect in setup_py._diagnose(step, "80;90a", "/cuda/bin/nvcc", lines)


CPU_TORCH = {"version": "2.13.0+cpu", "cuda": None}
CUDA_TORCH = {"version": "2.13.0+cu130", "cuda": "13.0"}


@pytest.mark.parametrize(("env", "torch_info", "nvcc", "expect"), [
    pytest.param({}, CUDA_TORCH, "/cuda/bin/nvcc", None, id="cuda-torch-builds"),
    pytest.param({}, None, "/cuda/bin/nvcc", None, id="no-torch-yet-builds"),
    pytest.param({}, CPU_TORCH, "/cuda/bin/nvcc", "torch 2.13.0+cpu is a CPU build",
                 id="cpu-torch-skips"),
    pytest.param({"DTOP_FORCE_CUDA_BUILD": "1"}, CPU_TORCH, "/cuda/bin/nvcc", None,
                 id="forced-builds"),
    pytest.param({"DTOP_FORCE_CUDA_BUILD": "1"}, CPU_TORCH, None, "no nvcc found",
                 id="forced-without-nvcc-skips"),
    pytest.param({"DTOP_SKIP_CUDA_BUILD": "1", "DTOP_FORCE_CUDA_BUILD": "1"}, CUDA_TORCH,
                 "/cuda/bin/nvcc", "DTOP_SKIP_CUDA_BUILD=1", id="skip-wins"),
    pytest.param({}, CUDA_TORCH, None, "no nvcc found", id="no-nvcc-skips"),
])
def test_build_decision_follows_the_installed_torch(setup_py, env, torch_info, nvcc,
                                                    expect) -> None:
    reason = setup_py.skip_reason(env, torch_info, nvcc)
    if expect is None:
        assert reason is None
    else:
        assert expect in reason
    if torch_info is CPU_TORCH and reason and "CPU build" in reason:
        assert "DTOP_FORCE_CUDA_BUILD=1" in reason  # the one line says how to build anyway


def test_installed_torch_is_read_from_the_target_interpreter(setup_py) -> None:
    """The build asks this interpreter (``-I``: outside pip's isolated build environment) which
    torch it has, without importing it."""
    import sys

    import torch

    found = setup_py.installed_torch(sys.executable)
    assert found == {"version": torch.__version__, "cuda": torch.version.cuda,
                     "dir": str(Path(torch.__file__).resolve().parent)}


def test_ops_library_decision(setup_py, tmp_path) -> None:
    """The op library needs torch's stable-ABI headers and a C++ compiler; it says which is
    missing."""
    import torch

    here = {"version": torch.__version__, "dir": str(Path(torch.__file__).resolve().parent)}
    assert setup_py.ops_library_skip_reason({}, here, "c++") is None
    assert "DTOP_SKIP_OPS_LIBRARY=1" in setup_py.ops_library_skip_reason(
        {"DTOP_SKIP_OPS_LIBRARY": "1"}, here, "c++")
    assert "install torch first" in setup_py.ops_library_skip_reason({}, None, "c++")
    old = {"version": "2.8.0", "dir": str(tmp_path)}
    assert "no stable-ABI headers" in setup_py.ops_library_skip_reason({}, old, "c++")
    assert "no C++ compiler" in setup_py.ops_library_skip_reason({}, here, None)
