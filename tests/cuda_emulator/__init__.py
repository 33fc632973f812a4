"""The CUDA emulator: the kernels of csrc/ executed on the CPU, through the package's own launch
code, under a memory checker and a race checker (docs/testing.md).

    module = cuda_emulator.load("race")          # or "memcheck" (needs libasan preloaded)
    with cuda_emulator.active(module):
        out = dtop_kernels.cuda.gather.gather_rows(x, indices, cu)   # CPU tensors
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.machinery
import importlib.util
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .build import VARIANTS, BuildError  # noqa: F401
from .build import build as build_module


@dataclass(frozen=True)
class Device:
    """The emulated GPU's limits that the kernels' host code and the launches see."""
    sm: int
    sm_count: int
    smem_default: int  # bytes of shared memory per block without the opt-in
    smem_optin: int    # ... with cudaFuncAttributeMaxDynamicSharedMemorySize


# sm_86 allows 99 KB per block, the least of the GPUs the sm_80 build serves: the default.
DEVICES = {
    "sm_80": Device(80, 108, 48 * 1024, 163 * 1024),
    "sm_86": Device(86, 84, 48 * 1024, 99 * 1024),
    "sm_90": Device(90, 132, 48 * 1024, 227 * 1024),
}


class KernelFault(AssertionError):
    """A kernel broke a rule of the execution model (race, uninitialized or out-of-bounds shared
    memory, deadlock, divergent barrier, a PTX misuse): the emulator's message, with source
    lines."""


def asan_loaded() -> bool:
    """AddressSanitizer's runtime is in this process (preloaded: the memcheck build needs it)."""
    try:
        return "libasan" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def asan_preload() -> str:
    """LD_PRELOAD for the memcheck build: g++'s AddressSanitizer runtime, then libstdc++ (the
    runtime finds the C++ functions it intercepts, such as __cxa_throw, only if libstdc++ is
    loaded when it starts, which python alone does not do)."""
    paths = []
    for lib in ("libasan.so", "libstdc++.so"):
        out = subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True,
                             check=False).stdout.strip()
        if not os.path.isabs(out):  # g++ prints the bare name when it has no such file
            raise BuildError(f"g++ has no {lib} (install it for the emulator's memcheck build)")
        paths.append(os.path.realpath(out))
    return " ".join(paths)


_LOADED: dict[str, ModuleType] = {}


def loaded() -> dict[str, ModuleType]:
    """{variant: module} of the default builds loaded in this process."""
    return dict(_LOADED)


def load(variant: str, path: str | None = None) -> ModuleType:
    """The emulated ``_C`` of ``variant`` ("memcheck" or "race"), built if needed (once per
    process); ``path``: a module built already (an injected-bug build), loaded anew."""
    if path is None and variant in _LOADED:
        return _LOADED[variant]
    module = _load(variant, path)
    if path is None:
        _LOADED[variant] = module
    return module


def _load(variant: str, path: str | None) -> ModuleType:
    """Imports a module of ``variant`` (built now unless ``path`` names one) with its ctypes
    handle for the emulator's own controls."""
    if variant == "memcheck" and not asan_loaded():
        raise BuildError("the memcheck build needs AddressSanitizer's runtime loaded first: run "
                         f"with LD_PRELOAD='{asan_preload()}' (pytest -m emulated does)")
    file = Path(path) if path else build_module(variant)
    name = f"dtop_emu_{variant}_{abs(hash(str(file)))}._C"
    loader = importlib.machinery.ExtensionFileLoader(name, str(file))
    spec = importlib.util.spec_from_file_location(name, str(file), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    module.__emu_file__ = str(file)
    module.__emu_variant__ = variant
    module.__emu_lib__ = ctypes.CDLL(str(file))
    lib = module.__emu_lib__
    lib.emu_executed.restype = ctypes.c_void_p
    lib.emu_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                                  ctypes.c_longlong]
    return module


_OPLIBS: dict[str, ctypes.CDLL] = {}


def load_oplib(variant: str, device: str | Device = "sm_86") -> str:
    """The op library's CUDA implementations over the emulated kernels of ``variant``, loaded:
    the ops ``torch.ops.dtop_emu_<variant>.<op>`` take CPU tensors. Returns the namespace."""
    import torch

    if variant == "memcheck" and not asan_loaded():
        raise BuildError("the memcheck build needs AddressSanitizer's runtime loaded first: run "
                         f"with LD_PRELOAD='{asan_preload()}' (pytest -m emulated does)")
    if variant not in _OPLIBS:
        path = build_module(variant, target="oplib")
        torch.ops.load_library(str(path))
        lib = ctypes.CDLL(str(path))
        lib.emu_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                                      ctypes.c_longlong]
        _OPLIBS[variant] = lib
    dev = DEVICES[device] if isinstance(device, str) else device
    _OPLIBS[variant].emu_configure(dev.sm, dev.sm_count, dev.smem_default, dev.smem_optin)
    return f"dtop_emu_{variant}"


def configure(module: ModuleType, device: Device) -> None:
    module.__emu_lib__.emu_configure(device.sm, device.sm_count, device.smem_default,
                                     device.smem_optin)


@contextlib.contextmanager
def active(module: ModuleType, device: str | Device = "sm_86") -> Iterator[ModuleType]:
    """Within: the CUDA backend of dtop_kernels takes CPU tensors and runs ``module``'s kernels
    on an emulated ``device`` (a name of DEVICES, or a Device); a kernel fault raises
    :class:`KernelFault` with source lines."""
    from dtop_kernels import cuda

    dev = DEVICES[device] if isinstance(device, str) else device
    configure(module, dev)
    with cuda.emulated(_Faults(module), dev.sm_count):
        yield module


class _Faults:
    """``module`` whose functions turn the emulator's faults into :class:`KernelFault` with the
    program counters resolved to source lines."""

    def __init__(self, module: ModuleType):
        self._module = module

    def __getattr__(self, name: str):
        fn = getattr(self._module, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except RuntimeError as e:
                if str(e).startswith("emulator:"):
                    raise KernelFault(symbolize(str(e))) from None
                raise

        return call


def symbolize(message: str) -> str:
    """``pc <library>+0x<offset>`` in an emulator message, followed by file:line (addr2line)."""
    def one(m: re.Match) -> str:
        lib, off = m.group(1), m.group(2)
        try:
            out = subprocess.run(["addr2line", "-C", "-f", "-i", "-e", lib, off],
                                 capture_output=True, text=True, timeout=30,
                                 check=False).stdout.split("\n")
        except (OSError, subprocess.SubprocessError):
            return m.group(0)
        frames = [f"{out[i + 1].strip()} ({out[i].strip()})" for i in range(0, len(out) - 1, 2)
                  if out[i + 1].strip() and not out[i + 1].startswith("??")]
        return " <- ".join(frames) if frames else m.group(0)

    return re.sub(r"pc (\S+)\+(0x[0-9a-f]+)", one, message)


def executed(module: ModuleType) -> dict[int, tuple[str, int]]:
    """{kernel symbol value: (its __PRETTY_FUNCTION__, launches)} since the module was loaded."""
    lib = module.__emu_lib__
    ptr = lib.emu_executed()
    try:
        text = ctypes.string_at(ptr).decode()
    finally:
        lib.emu_free(ctypes.c_void_p(ptr))
    out = {}
    for line in text.splitlines():
        offset, count, name = line.split("\t", 2)
        out[int(offset)] = (name, int(count))
    return out


@functools.cache
def instantiations(file: str) -> dict[int, str]:
    """{symbol value: demangled name} of every kernel instantiation in an emulator build: the
    functions of the build (nm) named after a ``__global__`` function of csrc/ (the rewriter
    lists them in kernels.txt beside the module)."""
    kernels = set(Path(file).with_name("kernels.txt").read_text().split())
    out = subprocess.run(["nm", "-C", "--defined-only", file], capture_output=True, text=True,
                         check=True).stdout
    pattern = re.compile(r"^([0-9a-f]+) [tTW] (?:void )?dtop::\(anonymous namespace\)::(\w+)[<(](.*)$")
    found = {}
    for line in out.splitlines():
        m = pattern.match(line)
        if m and m.group(2) in kernels and "[clone" not in line and "{lambda" not in line:
            found[int(m.group(1), 16)] = line.split(" ", 2)[2]
    return found
