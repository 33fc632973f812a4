"""The measured ``"auto"`` order per op and GPU architecture.

``auto_order.json`` (shipped in the package) holds, per GPU architecture (``"sm_90"``), the
order in which ``"auto"`` tries the backends of each op, from ``benchmarks/ops.py
--auto-order`` on such a GPU, fastest first, with the device, versions, date and commit of that
measurement beside it. A backend listed for an architecture counts as verified there (an entry
is committed only from a run whose GPU tests passed). Ops: :data:`OPS`; ``"layer_norm"`` is the
LayerNorm inside ``pruned_stage`` (fused with the gather on the kernel backends). One stage may
mix backends: each of its ops follows its own order.

Without an entry for the GPU (the state until a GPU run fills the table), ``"auto"`` uses each
op's built-in order, in which only the torch backend is verified: on CUDA that is cuBLAS GEMMs
on the packed rows and PyTorch's varlen attention. ``DTOP_AUTO_ORDER=path`` reads another
table file (e.g. a fresh measurement, before it is committed).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

TABLE = Path(__file__).with_name("auto_order.json")
OPS = ("gather_tokens", "scatter_tokens", "layer_norm", "packed_linear", "varlen_attention",
       "dtop_select")
BACKENDS = ("torch", "triton", "cuda")
FORMAT = 1


def table_path() -> Path:
    env = os.environ.get("DTOP_AUTO_ORDER", "").strip()
    return Path(env) if env else TABLE


def load(path: Path | None = None) -> dict:
    """The table at ``path`` (default :func:`table_path`), checked; re-read when the file
    changes."""
    path = Path(path) if path is not None else table_path()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as e:
        raise FileNotFoundError(f"auto-order table {path} cannot be read ({e}); unset "
                                "DTOP_AUTO_ORDER or point it at a table file") from e
    return _load(str(path), stamp)


@functools.cache
def _load(path: str, stamp: int) -> dict:
    table = json.loads(Path(path).read_text())
    check(table, path)
    return table


def check(table: object, where: str = "table") -> None:
    """Raise ValueError unless ``table`` has the documented layout."""
    if not isinstance(table, dict) or table.get("format") != FORMAT or \
            not isinstance(table.get("gpus"), dict):
        raise ValueError(f"{where}: an auto-order table is {{\"format\": {FORMAT}, \"gpus\": "
                         "{arch: entry}}")
    for arch, entry in table["gpus"].items():
        if not arch.startswith("sm_") or not isinstance(entry, dict):
            raise ValueError(f"{where}: GPU keys are architectures like 'sm_90'; got {arch!r}")
        for key in ("device", "torch", "date", "order"):
            if key not in entry:
                raise ValueError(f"{where}: {arch} lacks {key!r} (device, versions and date "
                                 "go beside every measured order)")
        for op, order in entry["order"].items():
            if op not in OPS:
                raise ValueError(f"{where}: {arch}: unknown op {op!r} (ops: {OPS})")
            if not order or any(b not in BACKENDS for b in order) or \
                    len(set(order)) != len(order):
                raise ValueError(f"{where}: {arch}: {op}: the order must list distinct backends "
                                 f"of {BACKENDS}; got {order!r}")


@functools.cache
def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def arch(device: torch.device) -> str | None:
    """``"sm_90"`` for a CUDA device, None for others."""
    if device.type != "cuda":
        return None
    return _arch(device)


def measured_order(op: str, device: torch.device) -> tuple[str, ...] | None:
    """The measured order of ``op`` on ``device``'s architecture, or None (no entry).

    Under ``torch.compile`` the lookup (a file ``stat`` and a GPU query, which dynamo cannot
    trace) runs once at trace time and its result is a constant of the graph: a compiled
    graph keeps the order it was traced with."""
    if torch.compiler.is_compiling():
        return _traced_order(op, device.type, -1 if device.index is None else device.index)
    return _order(op, device)


def _order(op: str, device: torch.device) -> tuple[str, ...] | None:
    a = arch(device)
    if a is None:
        return None
    entry = load()["gpus"].get(a)
    if entry is None or op not in entry["order"]:
        return None
    return tuple(entry["order"][op])


@torch.compiler.assume_constant_result
def _traced_order(op: str, device_type: str, index: int) -> tuple[str, ...] | None:
    return _order(op, torch.device(device_type, index) if index >= 0 else
                  torch.device(device_type))


def make_entry(env: dict, order: dict[str, list[str]], source: str) -> dict:
    """A table entry for one architecture: the orders and where they come from."""
    keys = ("device", "torch", "triton", "cuda", "date", "commit", "dtype")
    return {**{k: env.get(k) for k in keys}, "source": source, "order": order}
