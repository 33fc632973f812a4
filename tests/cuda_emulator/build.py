"""Builds the CUDA emulator's version of the extension ``_C`` from csrc/ with g++.

Two variants, each a Python module with ``_C``'s functions (csrc/bindings.cpp, unchanged):

- ``memcheck``: every translation unit compiled with AddressSanitizer and UBSan (the process
  must have libasan loaded first: ``python -m tests.cuda_emulator`` and ``pytest -m emulated``
  arrange it);
- ``race``: the kernels compiled with ThreadSanitizer's instrumentation, whose callbacks are the
  emulator's own shared- and global-memory race checker (runtime/racecheck.cpp), not TSan's
  runtime: it loads into any process.

Objects are cached by the hash of what they are compiled from, so a rebuild after a change (or
an injected bug) recompiles only the translation units it touches.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import rewrite as rw

HERE = Path(__file__).resolve().parent
RUNTIME = HERE / "runtime"
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
VARIANTS = ("memcheck", "race")

# -O1: the sanitizers' usual level (an -O0 build spends its time in the instrumentation).
BASE_FLAGS = ["-std=c++17", "-fPIC", "-O1", "-g1", "-fno-omit-frame-pointer", "-pthread"]
SANITIZE = {
    "memcheck": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "race": ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"],
}


class BuildError(RuntimeError):
    pass


def build_dir() -> Path:
    return Path(os.environ.get("DTOP_EMU_BUILD", REPO / "build" / "emulator"))


def cuda_include() -> Path:
    """The CUDA toolkit's include folder (for the host halves of cuda_fp16.h / cuda_bf16.h)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        # /usr/local/bin/nvcc may be a wrapper script: read the path it runs
        if real.stat().st_size < 4096:
            for word in real.read_text(errors="ignore").split():
                if word.endswith("/bin/nvcc"):
                    real = Path(word)
        candidates.append(str(real.parent.parent))
    candidates += ["/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return Path(c) / "include"
    raise BuildError("the CUDA toolkit's headers (cuda_fp16.h) were not found: set CUDA_HOME")


def compiler() -> str:
    cxx = os.environ.get("DTOP_EMU_CXX", "g++")
    if shutil.which(cxx) is None:
        raise BuildError(f"{cxx} not found (the emulator builds with g++; DTOP_EMU_CXX names "
                         "another)")
    return cxx


def _torch_dir() -> Path:
    import torch

    return Path(torch.__file__).resolve().parent


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _run(cmd: list[str], what: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # no ASan for g++ itself
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")


def _compile(cxx: str, src: Path, obj: Path, flags: list[str]) -> None:
    if obj.exists():
        return
    tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
    _run([cxx, *flags, "-c", str(src), "-o", str(tmp)], f"compiling {src.name}")
    tmp.replace(obj)


def build(variant: str, mutate=None, tag: str = "", target: str = "module") -> Path:
    """Path of the emulated ``_C`` module of ``variant`` (built if needed); with
    ``target="oplib"``, of the op library's CUDA implementations (csrc/oplib/dtop_ops_cuda.cpp,
    registered as ``dtop_emulated::`` ops on CPU tensors) over the same emulated kernels.

    ``mutate(name, text) -> text`` changes csrc/ sources before rewriting (injected bugs);
    ``tag`` names such a build's folder."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             check=True).stdout
    root = build_dir()
    # The rewritten sources, in a folder named by their content.
    staging = root / f"staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    info = rw.rewrite(CSRC, staging, mutate=mutate)
    (staging / "dtop_build_config.h").write_text('#pragma once\n#define DTOP_CUDA_ARCHS '
                                                 '"emulated"\n')
    files = sorted(staging.iterdir())
    src_hash = _digest(*[f.name + f.read_text() for f in files])
    src = root / f"src-{src_hash}"
    if src.exists():
        shutil.rmtree(staging)
    else:
        staging.replace(src)
    headers = _digest(*[f.read_text() for f in sorted(src.glob("*.h*")) if f.suffix != ".cu"],
                      *[f.read_text() for f in sorted(RUNTIME.rglob("*.h*"))],
                      *[f.read_text() for f in sorted((CSRC / "oplib").glob("*.h"))])

    import pybind11

    include = ["-I", str(src), "-I", str(RUNTIME), "-I", str(cuda_include())]
    emu_h = ["-include", str(RUNTIME / "emu.h")]
    py_include = ["-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"]]
    kernel_flags = [*BASE_FLAGS, *SANITIZE[variant], *include, *emu_h, "-x", "c++"]
    runtime_flags = [*BASE_FLAGS, *(SANITIZE[variant] if variant == "memcheck" else []),
                     *include]
    jobs = []  # (source, flags)
    for f in files:
        if f.suffix == ".cu":
            jobs.append((src / f.name, kernel_flags))
    link_extra: list[str] = []
    if target == "oplib":
        torch_dir = _torch_dir()
        jobs.append((CSRC / "oplib" / "dtop_ops_cuda.cpp",
                     [*BASE_FLAGS, *(SANITIZE[variant] if variant == "memcheck" else []),
                      f"-DDTOP_OPS_EMULATED=dtop_emu_{variant}", "-I", str(torch_dir / "include")]))
        link_extra = ["-L", str(torch_dir / "lib"), "-Wl,--no-as-needed", "-ltorch_cpu"]
    else:
        jobs.append((src / "bindings.cpp", [*BASE_FLAGS, *include, *emu_h, *py_include]))
    jobs.append((RUNTIME / "emu_runtime.cpp", runtime_flags))
    if variant == "race":
        jobs.append((RUNTIME / "racecheck.cpp", [*BASE_FLAGS, *include]))
    objdir = root / "obj"
    objdir.mkdir(parents=True, exist_ok=True)
    objs = []
    for source, flags in jobs:
        # the rewritten sources' folder is named by their hash: keep it out of the key, so that
        # a change to one source (an injected bug) recompiles that translation unit only
        key = _digest(version, " ".join(flags).replace(str(src), "<src>"), headers,
                      source.read_text())
        objs.append((source, objdir / f"{source.stem}-{key}.o", flags))
    workers = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers) as pool:
        # the slowest first: the attention sources
        order = sorted(objs, key=lambda o: -o[0].stat().st_size)
        for fut in [pool.submit(_compile, cxx, s, o, f) for s, o, f in order]:
            fut.result()
    link_flags = ["-fsanitize=address,undefined"] if variant == "memcheck" else []
    name = "_C" + sysconfig.get_config_var("EXT_SUFFIX") if target == "module" else \
        "libdtop_ops_emulated.so"
    prefix = variant if target == "module" else f"oplib-{variant}"
    out_dir = root / f"{prefix}{'-' + tag if tag else ''}-{_digest(*[str(o) for _, o, _ in objs])}"
    module = out_dir / name
    if not module.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"{name}.{os.getpid()}.tmp"
        _run([cxx, "-shared", "-pthread", *link_flags, *[str(o) for _, o, _ in objs],
              *link_extra, "-o", str(tmp)], f"linking the {variant} emulator")
        tmp.replace(module)
        (out_dir / "kernels.txt").write_text(
            "".join(f"{k}\n" for names in info.kernels.values() for k in names))
    return module


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("variants", nargs="*", default=list(VARIANTS))
    args = p.parse_args()
    for v in args.variants:
        print(build(v))


if __name__ == "__main__":
    sys.exit(main())
