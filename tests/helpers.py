"""Test helpers: device, backend parameters, ragged inputs, the error-ratio tolerance rule."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cuda_emulator import VARIANTS as EMULATOR_VARIANTS

from dtop_kernels import BackendError, TokenSet

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_skip() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if DEVICE.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "no GPU and TRITON_INTERPRET is not set"
    return None


def _cuda_skip() -> str | None:
    if DEVICE.type != "cuda":
        return "the compiled CUDA kernels need a GPU"
    from dtop_kernels.cuda import unavailable_reasons

    r = unavailable_reasons()
    return "; ".join(r) if r else None


def backend_marks(name: str) -> list:
    """A skip mark (with the reason) when backend ``name`` cannot run here, else none."""
    why = {"torch": lambda: None, "triton": _triton_skip, "cuda": _cuda_skip}[name]()
    return [pytest.mark.skip(reason=why)] if why else []


def backend_params(*names: str) -> list:
    """``pytest.param`` per backend, skipped (with the reason) where it cannot run here."""
    return [pytest.param(name, id=name, marks=backend_marks(name)) for name in names]


def cuda_kernel_test(fn):
    """For tests that call the launchers of ``dtop_kernels/cuda/`` directly: runs the test on
    the GPU (marked ``gpu``, skipped with the reason where the compiled kernels cannot run), and
    on the CUDA emulator's memcheck and race builds (marked ``emulated``: ``pytest -m emulated``).
    The test takes the ``kernel_device`` fixture: the device to put its tensors on."""
    params = [pytest.param("cuda", id="gpu", marks=[pytest.mark.gpu, *backend_marks("cuda")])]
    params += [pytest.param(v, id=f"emulated-{v}", marks=pytest.mark.emulated(v))
               for v in EMULATOR_VARIANTS]
    return pytest.mark.parametrize("kernel_device", params, indirect=True)(fn)


class EmulatedCuda(str):
    """The backend name "cuda" of a test run by the CUDA emulator (on CPU tensors; its marker
    names the build): equal to "cuda" wherever a test or the dispatch compares it."""

    def __new__(cls) -> EmulatedCuda:  # noqa: PYI034
        return super().__new__(cls, "cuda")


def emulated_cuda_params() -> list:
    """The "cuda" backend on each emulator build, for tests of the public ops on CPU tensors
    (``pytest -m emulated``; skipped where a GPU runs the real kernels)."""
    marks = [pytest.mark.skip(reason="a GPU runs the real kernels here")] \
        if DEVICE.type == "cuda" else []
    return [pytest.param(EmulatedCuda(), id=f"cuda-emulated-{v}",
                         marks=[pytest.mark.emulated(v), *marks]) for v in EMULATOR_VARIANTS]


def run_or_skip(fn, backend: str):
    """``fn()``; skips the test (with the dispatcher's reasons) when ``backend`` cannot run it."""
    try:
        return fn()
    except BackendError as e:
        pytest.skip(f"backend {backend!r} cannot run this call here:\n{e}")


def skip_interpreter_bf16_dot(backend: str, dtype: torch.dtype) -> None:
    """Triton 3.x's CPU interpreter computes ``tl.dot`` on bf16 operands wrongly (garbage of
    order 1e10 on a plain 16x16 product): bf16 matmul kernels are checked on a GPU only."""
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("the Triton CPU interpreter's tl.dot is wrong for bf16 operands")


def triton_cross_check(name: str, device: torch.device):
    """The Triton backend's module ``name`` (e.g. "attention") to cross-check a CUDA kernel's
    results against on a GPU; None for the emulated kernels (CPU tensors): the Triton kernels
    are checked against the same references under the interpreter, and the interpreter's tl.dot
    is wrong for bf16 (see skip_interpreter_bf16_dot)."""
    if device.type != "cuda":
        return None
    return importlib.import_module(f"dtop_kernels.triton.{name}")


def mixed_tokens(padded: bool) -> TokenSet:
    """3 images of 29 tokens (CPU): none active, all active, about half active."""
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(3, 29, generator=g) < 0.5
    keep[0] = False
    keep[1] = True
    return TokenSet.from_mask(keep, capacity=3 * 29 if padded else None)


def random_keep(b: int, n: int, counts: list[int], gen: torch.Generator) -> torch.Tensor:
    """Bool [B, N] with ``counts[i]`` active tokens at random positions in image i."""
    keep = torch.zeros(b, n, dtype=torch.bool)
    for i, c in enumerate(counts):
        keep[i, torch.randperm(n, generator=gen)[:c]] = True
    return keep


def make_tokens(keep: torch.Tensor, layout: str) -> TokenSet:
    """TokenSet of ``keep`` on DEVICE. layout: "exact" (capacity T), "padded" (capacity between T
    and B*N, padding slots), or "full" (capacity B*N, max_seqlen N)."""
    keep = keep.to(DEVICE)
    if layout == "exact":
        return TokenSet.from_mask(keep)
    b, n = keep.shape
    t = int(keep.sum())
    cap = b * n if layout == "full" else min(b * n, t + 5)
    return TokenSet.from_mask(keep, capacity=cap)


def ragged_tokens(counts: list[int], n: int, extra_capacity: int = 0, seed: int = 0,
                  device: torch.device = DEVICE) -> TokenSet:
    """TokenSet on ``device``: ``counts[b]`` random active tokens in image b of N (drawn from its
    own generator seeded ``seed``); capacity T + extra_capacity (at most B * N)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(len(counts), n, dtype=torch.bool)
    for b, c in enumerate(counts):
        keep[b, torch.randperm(n, generator=g)[:c]] = True
    cap = min(sum(counts) + extra_capacity, len(counts) * n)
    return TokenSet.from_mask(keep.to(device), capacity=cap)


def cu_from_counts(counts: list[int]) -> torch.Tensor:
    cu = [0]
    for c in counts:
        cu.append(cu[-1] + c)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


def assert_err_rule(
    got: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor, floor: float, what: str = ""
) -> None:
    """flash-attention's rule: err(kernel) <= 2 * err(PyTorch in the same dtype) + floor, both
    measured against ``exact`` (float64)."""
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = max_err(got, exact)
    base = max_err(same_dtype, exact)
    assert err <= 2 * base + floor, f"{what}: error {err:.3g} > 2 * {base:.3g} + {floor:g}"


def compiled_asm(kernel: str, dtype: str = "float16", arch: int = 90) -> dict[str, str]:
    """{"ttir", "ttgir", "ptx": text} of Triton kernel ``kernel`` as its launcher calls it at
    ViT-B shapes in ``dtype``, compiled ahead of time for sm_<arch> (no GPU needed): runs
    tests/compile_kernels.py without the interpreter, in a subprocess, on this dtop_kernels."""
    import dtop_kernels

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    where = str(Path(dtop_kernels.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (where, env.get("PYTHONPATH")) if p)
    script = Path(__file__).resolve().parent / "compile_kernels.py"
    proc = subprocess.run([sys.executable, str(script), "--arch", str(arch), "--emit",
                           "--kernel", kernel, "--dtype", dtype], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"compiling {kernel} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)
