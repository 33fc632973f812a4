"""Explicit backend dispatch shared by every public op, and the public registry of ops.

Every op takes ``backend="auto" | "torch" | "triton" | "cuda"``; the environment variable
``DTOP_BACKEND`` overrides the argument process-wide. Each backend answers ``why_not(...)``: the
list of reasons it cannot run a given call (empty = it can), from what the backend package
declares it supports (``dtop_kernels.triton``, ``dtop_kernels.cuda``; the torch backend runs
everything). ``"auto"`` takes the first backend with no reasons in the order measured on the
call's GPU architecture (:mod:`dtop_kernels.auto_order`), then in the op's built-in
``auto_order`` among the backends :data:`VERIFIED` lists; when nothing can run, or an explicit
backend cannot, the error lists every backend's reasons. :func:`dispatcher` returns an op's
dispatcher by name (``info`` and the benchmarks use it).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import torch

BACKENDS = ("torch", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

WhyNot = Callable[..., list[str]]

# The one verification table: per op, the backends that have passed every GPU test and
# sanitizer run, which "auto" may take (in the op's built-in order) on a GPU without a measured
# order in auto_order.json; a backend measured there counts as verified on that architecture.
# No Triton or CUDA kernel has run on a GPU yet: only the reference. An explicit request for an
# unverified backend runs it, with a warning.
VERIFIED: dict[str, tuple[str, ...]] = {
    op: ("torch",) for op in ("gather_tokens", "scatter_tokens", "varlen_attention",
                              "packed_linear", "pruned_block", "dtop_select")
}
_REGISTRY: dict[str, Dispatcher] = {}


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


# ---------------------------------------------------------------------- dispatch
def dispatcher(op: str) -> Dispatcher:
    """The dispatcher of public op ``op`` ("gather_tokens", "varlen_attention", ...); the ops
    register theirs when ``dtop_kernels`` is imported."""
    if op not in _REGISTRY:
        raise KeyError(f"no op {op!r}; ops: {sorted(_REGISTRY)}")
    return _REGISTRY[op]


def register(d: Dispatcher) -> Dispatcher:
    """Add a public op's dispatcher to the registry (:func:`dispatcher`, :func:`ops`)."""
    if d.op in _REGISTRY and _REGISTRY[d.op] is not d:
        raise ValueError(f"op {d.op!r} is registered already")
    _REGISTRY[d.op] = d
    return d


def ops() -> tuple[str, ...]:
    """The names of the dispatched public ops."""
    return tuple(_REGISTRY)


class Dispatcher:
    """Per-op dispatch table: ``why_not`` per backend and the ``auto`` order.

    Backends that :data:`VERIFIED` does not list for the op have not yet passed their GPU
    tests: "auto" skips them and an explicit request warns.
    """

    def __init__(self, op: str, why_not: dict[str, WhyNot], auto_order: Sequence[str]) -> None:
        missing = set(BACKENDS) - set(why_not)
        if missing:
            raise ValueError(f"{op}: no why_not for {sorted(missing)}")
        self.op = op
        self.why_not = why_not
        self.auto_order = tuple(auto_order)

    @property
    def unverified(self) -> frozenset[str]:
        return frozenset(BACKENDS) - frozenset(VERIFIED.get(self.op, ("torch",)))

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
                        "not in the auto order for this op" if name not in self.auto_order
                        else f"not yet verified on a GPU: pass backend={name!r} explicitly"
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
