"""Explicit backend dispatch shared by every public op.

Every op takes ``backend="auto" | "torch" | "triton" | "cuda"``; the environment variable
``DTOP_BACKEND`` overrides the argument process-wide. Each backend answers ``why_not(...)``: the
list of reasons it cannot run a given call (empty = it can). ``"auto"`` takes the first backend
with no reasons in the order measured on the call's GPU architecture
(:mod:`dtop_kernels.auto_order`), then in the op's built-in ``auto_order`` (verified backends
only); when nothing can run, or an explicit backend cannot, the
error lists every backend's reasons.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

WhyNot = Callable[..., list[str]]


class BackendError(RuntimeError):
    """No backend can run the call; the message lists each backend's reasons."""


def requested_backend(backend: str) -> str:
    """The backend asked for: ``DTOP_BACKEND`` if set, else the argument."""
    env = os.environ.get("DTOP_BACKEND", "").strip().lower()
    choice = env or backend
    if choice not in _CHOICES:
        src = "DTOP_BACKEND" if env else "backend"
        raise ValueError(f"{src} must be one of {_CHOICES}; got {choice!r}")
    return choice


# ---------------------------------------------------------------------- availability
@functools.cache
def triton_import_error() -> str | None:
    """None when triton imports, else why not (cached; imports triton only once)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'triton>=3.1')"
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure is a reason, not a crash
        return f"triton fails to import: {e}"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_reasons_triton(tensors: Iterable[torch.Tensor]) -> list[str]:
    """Reasons from the environment and devices alone (not from the op's shapes)."""
    err = triton_import_error()
    if err:
        return [err]
    devs = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    if devs - {"cuda"} and not triton_interpret():
        return [(f"tensors on {sorted(devs - {'cuda'})}: Triton needs CUDA tensors "
                 "(or TRITON_INTERPRET=1 for the CPU interpreter, slow, for tests)")]
    return []


def device_reasons_cuda(tensors: Iterable[torch.Tensor]) -> list[str]:
    from dtop_kernels.cuda import device_reasons, unavailable_reasons

    reasons = list(unavailable_reasons())
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    types = {d.type for d in devices}
    if types - {"cuda"}:
        reasons.append(f"tensors on {sorted(types - {'cuda'})}: the CUDA kernels need CUDA "
                       "tensors")
    elif not reasons:  # built, all on CUDA: is there a kernel image for each GPU?
        for device in sorted(devices, key=str):
            reasons += [r for r in device_reasons(device) if r not in reasons]
    return reasons


def not_implemented(op: str, backend: str) -> WhyNot:
    def why_not(*args, **kwargs) -> list[str]:
        return [f"no {backend} kernel for {op} yet"]

    return why_not


# ---------------------------------------------------------------------- dispatch
class Dispatcher:
    """Per-op dispatch table: ``why_not`` per backend and the ``auto`` order.

    ``unverified`` names backends whose kernels have not yet passed their GPU tests: "auto"
    skips them and an explicit request warns.
    """

    def __init__(
        self,
        op: str,
        why_not: dict[str, WhyNot],
        auto_order: Sequence[str],
        unverified: Sequence[str] = (),
    ) -> None:
        missing = set(BACKENDS) - set(why_not)
        if missing:
            raise ValueError(f"{op}: no why_not for {sorted(missing)}")
        self.op = op
        self.why_not = why_not
        self.auto_order = tuple(auto_order)
        self.unverified = frozenset(unverified)

    def reasons(self, *args, **kwargs) -> dict[str, list[str]]:
        """Every backend's reasons for this call (empty list = can run)."""
        return {name: list(self.why_not[name](*args, **kwargs)) for name in BACKENDS}

    def select(self, backend: str, *args, **kwargs) -> str:
        """The backend that runs this call; raises BackendError listing every reason.

        Asks only the backends it needs on success; the full table is built for the error.
        """
        choice = requested_backend(backend)
        if choice == "auto":
            measured = _measured(self.op, args, kwargs)
            for name in measured:  # measured on this GPU's architecture: verified there
                if not self.why_not[name](*args, **kwargs):
                    return name
            for name in self.auto_order:
                if name not in self.unverified and not self.why_not[name](*args, **kwargs):
                    return name
            table = self.reasons(*args, **kwargs)
            for name in BACKENDS:
                if not table[name]:
                    table[name] = [
                        f"not yet verified on a GPU: pass backend={name!r} explicitly"
                        if name in self.unverified else "not in the auto order for this op"
                    ]
            raise BackendError(_format(self.op, "auto", table))
        if self.why_not[choice](*args, **kwargs):
            raise BackendError(_format(self.op, choice, self.reasons(*args, **kwargs)))
        if choice in self.unverified and not torch.compiler.is_compiling():
            warnings.warn(
                f"dtop_kernels.{self.op}: the {choice} kernel has not yet passed its tests on a "
                "GPU; results are unverified",
                stacklevel=3,
            )
        return choice


def _measured(op: str, args: tuple, kwargs: dict) -> tuple[str, ...]:
    """The measured auto order of ``op`` for the device of the call's first tensor (or
    TokenSet), from dtop_kernels/auto_order.json; empty without an entry."""
    from dtop_kernels import auto_order

    for a in (*args, *kwargs.values()):
        dev = getattr(a, "device", None)
        if isinstance(dev, torch.device):
            return auto_order.measured_order(op, dev) or ()
    return ()


def _format(op: str, asked: str, table: dict[str, list[str]]) -> str:
    lines = [f"dtop_kernels.{op}: backend {asked!r} cannot run this call."]
    for name in BACKENDS:
        r = table.get(name) or ["can run"]
        lines.append(f"  {name}: " + "; ".join(r))
    return "\n".join(lines)
