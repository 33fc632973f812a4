"""CUDA's host side on a machine without a GPU: fake CUDA tensors, recorded kernel launches and a
check that fails on anything that would make the host wait for the device.

A CUDA build of torch creates CUDA tensors without a device under ``FakeTensorMode`` (shapes,
dtypes and devices, no memory). :func:`fake_cuda` runs the package's code on such tensors as it
runs on a GPU of a chosen architecture, with only the device itself replaced:

- ``torch.cuda`` queries answer for that GPU (capability, SM count, current device and stream);
- the launches of Triton kernels (``kernel[grid](...)``) and of the compiled module's functions
  (``dtop_kernels._C``) are recorded and checked (grid, devices, dtypes), not run;
- every ``dtop_py::`` custom op runs its real implementation (the Python around the kernels), not
  its fake one;
- :class:`HostSyncCheck` raises :class:`HostSync` on every op that would make the host wait for
  the device on a real GPU: scalar read-backs (``item``, ``_local_scalar_dense``), outputs whose
  shape depends on the data (``nonzero``, boolean-mask indexing), copies between the host and the
  device, and CPU tensors handed to a CUDA op (other than the 0-d scalars that elementwise ops
  take as kernel arguments).

torch's C++ entry points take a CUDA device guard before they dispatch, which asks the CUDA
runtime for the current device: ``tests/fake_cuda_shim.c``, preloaded, answers "device 0" (and
nothing else). ``python tests/fake_cuda.py`` builds it with the C compiler and runs
``tests/test_fake_cuda.py`` under it (CI does, with a CUDA build of torch); without it those tests
skip.

What this cannot see: anything the device computes (values are never computed), kernel
correctness and speed, the caching allocator, streams and events as the driver orders them.
The autograd engine needs a real device, so :func:`backward` walks the autograd graph itself
(every node's own backward, in dependency order).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
SM_COUNT = {(8, 0): 108, (9, 0): 132}  # A100, H100 / H200
ARCHS = tuple(SM_COUNT)


SHIM = Path(__file__).with_name("fake_cuda_shim.c")
SHIM_LIB = "libdtop_fake_cuda_shim.so"


def available() -> str | None:
    """None when fake CUDA runs here, else why not."""
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU build: fake CUDA tensors need a CUDA build "
                "of torch (CI runs these tests with torch 2.14.1)")
    if SHIM_LIB not in os.environ.get("LD_PRELOAD", ""):
        return ("the device-guard shim is not preloaded: run `python tests/fake_cuda.py` (it "
                "builds tests/fake_cuda_shim.c and runs tests/test_fake_cuda.py under it)")
    return None


def main(argv: list[str]) -> int:
    """Build the shim and run tests/test_fake_cuda.py (extra arguments go to pytest)."""
    import shutil
    import subprocess
    import sys
    import tempfile

    if torch.version.cuda is None:
        print(available())
        return 1
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        print("no C compiler (cc / gcc) to build tests/fake_cuda_shim.c")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / SHIM_LIB
        subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(SHIM)], check=True)
        env = {**os.environ, "LD_PRELOAD": os.pathsep.join(
            p for p in (str(lib), os.environ.get("LD_PRELOAD")) if p)}
        cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_fake_cuda.py"),
               "-p", "no:cacheprovider", *argv]
        return subprocess.run(cmd, env=env, cwd=ROOT).returncode


class HostSync(AssertionError):
    """An op that would make the host wait for the device (or a recorded launch that is wrong)."""


# ---------------------------------------------------------------------- the sync check
_aten = torch.ops.aten
# outputs whose shape depends on the data: the size is read back before the output exists
_DYNAMIC = {_aten.nonzero.default, _aten.masked_select.default, _aten.unique_dim.default,
            _aten._unique2.default, _aten.unique_consecutive.default,
            _aten.repeat_interleave.Tensor, _aten.argwhere.default}
_READBACK = {_aten._local_scalar_dense.default, _aten.item.default, _aten.is_nonzero.default,
             _aten.equal.default, _aten.allclose.default}
_COPIES = {_aten._to_copy.default, _aten.copy_.default, _aten._copy_from.default,
           _aten._copy_from_and_resize.default, _aten.to.dtype_layout, _aten.to.device,
           _aten.to.other, _aten.to.dtype}


def _tensors(args, kwargs) -> list[torch.Tensor]:
    flat = torch.utils._pytree.tree_leaves((args, kwargs))
    return [a for a in flat if isinstance(a, torch.Tensor)]


def _device_of(x) -> str:
    return x.device.type if isinstance(x, torch.Tensor) else str(torch.device(x).type)


def _is_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


class HostSyncCheck(TorchDispatchMode):
    """Raises :class:`HostSync` naming the op (and where it was called from) on every op that
    would make the host wait for a CUDA device. Inside :func:`fake_cuda` it also runs the real
    implementation of the ``dtop_py::`` custom ops."""

    def __init__(self, real_custom_ops: bool = True) -> None:
        super().__init__()
        self.real_custom_ops = real_custom_ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        on_cuda = any(_is_cuda(t) for t in tensors)
        problem = None
        if func in _READBACK and on_cuda:
            problem = "reads a device value back to the host"
        elif func in _DYNAMIC and on_cuda:
            problem = "has an output shape that depends on device data (read back first)"
        elif func in (_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if on_cuda and any(i is not None and i.dtype == torch.bool for i in idx):
                problem = "indexes with a boolean mask (the count is read back first)"
        if problem is None and func in _COPIES and tensors:
            src = "cuda" if _is_cuda(tensors[0]) else tensors[0].device.type
            dst = kwargs.get("device")
            if func in (_aten.copy_.default, _aten._copy_from.default,
                        _aten._copy_from_and_resize.default):
                dst, src = (["cuda" if _is_cuda(t) else t.device.type for t in tensors[:2]])
            elif func is _aten.to.other:
                dst = tensors[1].device.type
            elif func is _aten.to.device:
                dst = _device_of(args[1])
            dst = src if dst is None else _device_of(dst)
            if {src, dst} == {"cpu", "cuda"}:
                problem = f"copies between the host and the device ({src} -> {dst})"
        if problem is None and on_cuda and func not in _COPIES:
            cpu = [t for t in tensors if t.device.type == "cpu"]
            pointwise = torch.Tag.pointwise in func.tags
            if any(t.dim() > 0 or not pointwise for t in cpu):
                problem = ("takes a CPU tensor as an operand of a CUDA op (copied to the "
                           "device first)")
        if problem is not None:
            raise HostSync(f"{func} {problem}; on a GPU the host waits for the device here")
        if self.real_custom_ops and func.namespace == "dtop_py":
            real = _REAL_OPS.get(func._schema.name)
            if real is not None:
                with self:
                    return real(*args, **kwargs)
        return func(*args, **kwargs)


@functools.cache
def _real_ops_table() -> dict:
    from dtop_kernels.ops import library

    return {f"{library.NS}::{op._name.split('::')[-1]}": op._init_fn for op in library.OPS}


class _RealOps(dict):
    def get(self, key, default=None):  # filled on first use (after dtop_kernels is imported)
        return _real_ops_table().get(key, default)


_REAL_OPS = _RealOps()


# ---------------------------------------------------------------------- recorded launches
@dataclass
class Launch:
    backend: str  # "triton" or "cuda"
    kernel: str
    grid: tuple[int, ...] = ()
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


class Launches(list):
    """The recorded kernel launches of one :func:`fake_cuda` block."""

    def names(self, backend: str | None = None) -> set[str]:
        return {x.kernel for x in self if backend in (None, x.backend)}


def _check_launch_tensors(where: str, tensors: list[torch.Tensor]) -> None:
    devices = {t.device for t in tensors}
    if any(d.type != "cuda" for d in devices):
        raise HostSync(f"{where}: launched with tensors on {sorted(map(str, devices))}; a kernel "
                       "takes device memory only")
    if len(devices) > 1:
        raise HostSync(f"{where}: launched with tensors on several devices {devices}")


def _triton_recorder(launches: Launches):
    def getitem(kernel, grid):
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__

        def launch(*args, **kwargs):
            g = grid(dict(kwargs)) if callable(grid) else grid
            g = tuple(g) if isinstance(g, (tuple, list)) else (g,)
            if not g or not all(isinstance(v, int) and not isinstance(v, bool) for v in g):
                raise HostSync(f"triton {name}: grid {g!r} must be host ints (a device value "
                               "would be read back)")
            limits = (2**31 - 1, 65535, 65535)
            if any(v < 0 or v > lim for v, lim in zip(g, limits)):
                raise HostSync(f"triton {name}: grid {g} outside the launch limits {limits}")
            _check_launch_tensors(f"triton {name}", _tensors(args, kwargs))
            launches.append(Launch("triton", name, g, args, kwargs))
        return launch
    return getitem


class _FakeC:
    """Stands in for ``dtop_kernels._C``: what it reports about its build comes from the sources,
    every kernel function records its launch (pointer arguments must be device pointers of fake
    tensors)."""

    def __init__(self, launches: Launches, archs: str) -> None:
        self._launches, self._archs = launches, archs

    def built_archs(self) -> str:
        return self._archs

    def head_dims(self) -> list[int]:
        return compiled_head_dims()

    def select_workspace_bytes(self, capacity: int) -> int:
        """A size of the right kind (the real one comes from CUB's query)."""
        return 512 + 16 * capacity

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        expected = bound_arguments().get(name)
        if expected is None:
            raise AttributeError(f"csrc/bindings.cpp binds no function {name!r}")

        def launch(*args):
            if expected and len(args) != len(expected):
                raise HostSync(f"_C.{name}: called with {len(args)} arguments; the binding takes "
                               f"{len(expected)} ({', '.join(expected)})")
            for a in args:
                if isinstance(a, torch.Tensor):
                    raise HostSync(f"_C.{name}: takes device pointers and host scalars; got a "
                                   "tensor")
            self._launches.append(Launch("cuda", name, (), args))
        return launch


@functools.cache
def bound_arguments() -> dict[str, list[str]]:
    """Each function csrc/bindings.cpp binds, with its argument names (py::arg)."""
    text = (ROOT / "csrc" / "bindings.cpp").read_text()
    out = {}
    for chunk in text.split("m.def(")[1:]:
        name = re.match(r'\s*"(\w+)"', chunk)
        if name:
            out[name.group(1)] = re.findall(r'py::arg\("(\w+)"\)', chunk)
    return out


@functools.cache
def compiled_head_dims() -> list[int]:
    """The attention head dims csrc/attention.cuh instantiates (what _C.head_dims() reports)."""
    text = (ROOT / "csrc" / "attention.cuh").read_text()
    m = re.search(r"#define DTOP_FOR_EACH_HEAD_DIM\(X\)(.*)", text)
    if m is None:
        raise RuntimeError("csrc/attention.cuh: no DTOP_FOR_EACH_HEAD_DIM list found")
    return [int(v) for v in re.findall(r"X\((\d+)\)", m.group(1))]


_PTR = 1 << 20  # a 16-byte aligned fake device address


def _fake_data_ptr(self) -> int:
    return _PTR


# ---------------------------------------------------------------------- CUDA graphs
class _FakeGraph:
    def __init__(self, *args, **kwargs) -> None:
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


class _FakeStream:
    def __init__(self, device=None, *args, **kwargs) -> None:
        self.device = torch.device("cuda", 0)
        self.cuda_stream = 0x5000

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        raise HostSync("Stream.synchronize() makes the host wait for the device")


@contextlib.contextmanager
def _graph_capture(graph, pool=None, stream=None, **kwargs):
    """``torch.cuda.graph``: the captured region may not synchronize (a real capture fails)."""
    with HostSyncCheck():
        yield


@contextlib.contextmanager
def _null_context(*args, **kwargs):
    yield


# ---------------------------------------------------------------------- the context
@contextlib.contextmanager
def fake_cuda(arch: tuple[int, int] = (9, 0), *, check: bool = True) -> Iterator[Launches]:
    """Run the block as on one CUDA GPU of compute capability ``arch`` with fake tensors.

    Yields the list of recorded launches. With ``check`` the whole block runs under
    :class:`HostSyncCheck`; without it, wrap the part to check yourself (build models and
    inputs outside it). Tensors made inside are fake (``torch.empty(..., device="cuda")``);
    modules are built on the device with :func:`on_device`.
    """
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from dtop_kernels import auto_order
    from dtop_kernels import cuda as dk_cuda

    reason = available()
    if reason:
        raise RuntimeError(reason)
    launches = Launches()
    fake_c = _FakeC(launches, "80;90")
    props = SimpleNamespace(name=f"fake sm_{arch[0]}{arch[1]}", major=arch[0], minor=arch[1],
                            multi_processor_count=SM_COUNT.get(arch, 100),
                            total_memory=80 << 30)
    from dtop_kernels import _gpu

    # answers cached per process that depend on the (fake) GPU
    caches = (auto_order._arch, dk_cuda._import_C, dk_cuda._device_arch_reason, _gpu._sm_count)
    patches: list[tuple[object, str, object]] = [
        (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "get_device_capability", lambda device=None: arch),
        (torch.cuda, "get_device_properties", lambda device=None: props),
        (torch.cuda, "get_device_name", lambda device=None: props.name),
        (torch.cuda, "current_stream", lambda device=None: _FakeStream()),
        (torch.cuda, "Stream", _FakeStream),
        (torch.cuda, "stream", _null_context),
        (torch.cuda, "device", _null_context),
        (torch.cuda, "CUDAGraph", _FakeGraph),
        (torch.cuda, "graph", _graph_capture),
        (torch.cuda, "synchronize", _raise_sync),
        (dk_cuda, "_import_C", lambda: (fake_c, None)),
        (FakeTensor, "data_ptr", _fake_data_ptr),
    ]
    try:
        import triton.runtime.interpreter as t_interp
        import triton.runtime.jit as t_jit

        patches += [(t_jit.JITFunction, "__getitem__", _triton_recorder(launches)),
                    (t_interp.InterpretedFunction, "__getitem__", _triton_recorder(launches))]
    except ImportError:
        pass
    saved = [(obj, name, obj.__dict__.get(name, _MISSING)) for obj, name, _ in patches]
    old_interp = os.environ.get("TRITON_INTERPRET")
    for c in caches:
        c.cache_clear()
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        os.environ["TRITON_INTERPRET"] = "0"  # the launchers pick their GPU settings
        with FakeTensorMode(allow_non_fake_inputs=True):
            with HostSyncCheck() if check else _real_ops_only():
                yield launches
    finally:
        for obj, name, value in saved:
            if value is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
        if old_interp is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_interp
        for c in caches:
            c.cache_clear()


_MISSING = object()


def _raise_sync(*args, **kwargs):
    raise HostSync("torch.cuda.synchronize() makes the host wait for the device")


@contextlib.contextmanager
def _real_ops_only():
    """The real ``dtop_py::`` op implementations without the sync check: a check that lets
    everything through."""
    mode = _PermissiveCheck()
    with mode:
        yield


class _PermissiveCheck(HostSyncCheck):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "dtop_py":
            real = _REAL_OPS.get(func._schema.name)
            if real is not None:
                with self:
                    return real(*args, **kwargs)
        return func(*args, **kwargs)


def moved_to_device(module: torch.nn.Module, dtype: torch.dtype | None = None):
    """``module`` (built outside :func:`fake_cuda`, e.g. a timm or transformers model whose
    construction reads values back) with every parameter and buffer replaced, in place, by a
    fake CUDA tensor of its shape (floating ones in ``dtype``); call inside :func:`fake_cuda`."""
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in list(table.items()):
                if t is None:
                    continue
                new = torch.empty(t.shape, device="cuda",
                                  dtype=dtype if dtype is not None and t.is_floating_point()
                                  else t.dtype)
                if isinstance(t, torch.nn.Parameter):
                    new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                table[name] = new
    return module


def on_device(build, dtype: torch.dtype | None = None):
    """``build()`` with its parameters and buffers on the fake CUDA device (inside
    :func:`fake_cuda`). Built on "meta" (random initialization would need a CUDA generator),
    then relabelled: fake tensors carry no values anyway."""
    from torch._subclasses.fake_tensor import FakeTensor

    prev, prev_dtype = torch.get_default_device(), torch.get_default_dtype()
    torch.set_default_device("meta")
    torch.set_default_dtype(dtype or prev_dtype)  # Module.to() cannot swap fake parameters
    try:
        module = build()
    finally:
        torch.set_default_device(prev)
        torch.set_default_dtype(prev_dtype)
    for t in [*module.parameters(), *module.buffers()]:
        if not isinstance(t, FakeTensor):
            raise RuntimeError("on_device must be called inside fake_cuda()")
        t.fake_device = torch.device("cuda", 0)
    return module


# ---------------------------------------------------------------------- backward
def backward(output: torch.Tensor, grad: torch.Tensor | None = None) -> None:
    """``output.backward(grad)`` without the autograd engine (which needs a real device):
    every node's own backward runs once all its consumers have run, as the engine orders them;
    leaf gradients accumulate into ``.grad``."""
    root = output.grad_fn
    if root is None:
        raise ValueError("output does not require grad")
    grad = torch.ones_like(output) if grad is None else grad
    pending: dict = {}
    stack, seen = [root], {root}
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            pending[nxt] = pending.get(nxt, 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    inputs: dict = {root: [grad]}
    ready = [root]
    while ready:
        node = ready.pop()
        grads = inputs.pop(node)
        if node.name().endswith("AccumulateGrad"):
            var = node.variable
            if grads[0] is not None:
                var.grad = grads[0] if var.grad is None else var.grad + grads[0]
            continue
        outs = (node.apply if hasattr(node, "apply") else node)(*grads)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for (nxt, i), g in zip(node.next_functions, outs):
            if nxt is None:
                continue
            buf = inputs.setdefault(nxt, [None] * len(nxt._input_metadata))
            if g is not None:
                shape = tuple(nxt._input_metadata[i].shape)
                if tuple(g.shape) != shape:  # broadcast inputs: reduce as the engine does
                    g = g.sum_to_size(shape)
                buf[i] = g if buf[i] is None else buf[i] + g
            pending[nxt] -= 1
            if pending[nxt] == 0:
                ready.append(nxt)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
