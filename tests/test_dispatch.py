"""Backend dispatch: explicit backends, DTOP_BACKEND, error messages, import side effects, info."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from blocks import Block

import dtop_kernels
from dtop_kernels import (
    BackendError,
    TokenSet,
    dtop_select,
    gather_tokens,
    pruned_block,
    pruned_stage,
    scatter_tokens,
    varlen_attention,
)
from dtop_kernels.backends import Dispatcher

ROOT = Path(__file__).resolve().parent.parent
BACKEND_NAMES = ("torch", "triton", "cuda")


def _calls() -> dict:
    """One small CPU call per public op: name -> fn(backend)."""
    ts = TokenSet.from_lists([[0, 2, 3], [1]], seq_len=5)
    x = torch.randn(2, 5, 16)
    packed = torch.randn(ts.capacity, 16)
    q = torch.randn(ts.capacity, 2, 8)
    blk = Block(16, 2, mlp_ratio=1.0).eval()
    cls, ml = torch.randn(2, 3, 2), torch.randn(3, ts.capacity)
    cu, m = ts.cu_seqlens, ts.max_seqlen
    return {
        "gather_tokens": lambda be: gather_tokens(x, ts, backend=be),
        "scatter_tokens": lambda be: scatter_tokens(packed, ts, x.clone(), backend=be),
        "varlen_attention": lambda be: varlen_attention(q, q, q, cu, cu, m, m, backend=be),
        "pruned_block": lambda be: pruned_block(x, ts, blk, backend=be),
        "pruned_stage": lambda be: pruned_stage(x, ts, [blk, blk], backend=be),
        "dtop_select": lambda be: dtop_select(cls, ml, ts, 0.5, backend=be),
    }


OPS = [pytest.param(name, id=name) for name in _calls()]


@pytest.fixture
def no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors are then out of Triton's reach."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", [pytest.param("torch", id="torch"),
                                     pytest.param("auto", id="auto")])
def test_torch_and_auto_run_on_cpu(op, backend):
    _calls()[op](backend)


@pytest.mark.parametrize("op", OPS)
def test_auto_matches_torch_on_cpu(op, no_interpreter):
    fn = _calls()[op]
    torch.manual_seed(0)
    a = fn("auto")
    torch.manual_seed(0)
    b = fn("torch")
    if op == "dtop_select":
        assert torch.equal(a.exited, b.exited)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", [pytest.param("triton", id="triton"),
                                     pytest.param("cuda", id="cuda")])
def test_kernel_backend_on_cpu_lists_every_reason(op, backend, no_interpreter):
    with pytest.raises(BackendError) as info:
        _calls()[op](backend)
    msg = str(info.value)
    assert repr(backend) in msg
    lines = msg.splitlines()
    for name in BACKEND_NAMES:
        assert any(line.strip().startswith(f"{name}:") for line in lines), (name, msg)
    torch_line = next(line for line in lines if line.strip().startswith("torch:"))
    assert "can run" in torch_line
    asked = next(line for line in lines if line.strip().startswith(f"{backend}:"))
    assert "can run" not in asked
    if backend == "triton":
        assert "cpu" in asked.lower() or "triton" in asked.lower()


def test_backend_error_is_runtime_error():
    assert issubclass(BackendError, RuntimeError)


# ---------------------------------------------------------------------- DTOP_BACKEND
@pytest.mark.parametrize("op", OPS)
def test_env_overrides_argument(op, monkeypatch, no_interpreter):
    monkeypatch.setenv("DTOP_BACKEND", "torch")
    _calls()[op]("cuda")  # would raise without the override
    monkeypatch.setenv("DTOP_BACKEND", "cuda")
    with pytest.raises(BackendError):
        _calls()[op]("torch")


def test_env_is_case_and_space_insensitive(monkeypatch, no_interpreter):
    monkeypatch.setenv("DTOP_BACKEND", "  TORCH ")
    _calls()["gather_tokens"]("triton")


def test_empty_env_means_argument(monkeypatch):
    monkeypatch.setenv("DTOP_BACKEND", "")
    _calls()["gather_tokens"]("torch")


@pytest.mark.parametrize("op", OPS)
def test_invalid_env_value(op, monkeypatch):
    monkeypatch.setenv("DTOP_BACKEND", "tpu")
    with pytest.raises(ValueError, match="DTOP_BACKEND"):
        _calls()[op]("torch")


@pytest.mark.parametrize("op", OPS)
def test_invalid_argument(op):
    with pytest.raises(ValueError, match="backend"):
        _calls()[op]("numpy")


# ---------------------------------------------------------------------- Dispatcher
def test_auto_error_lists_every_backend():
    d = Dispatcher(
        "toy",
        {"torch": lambda *a: ["torch says no"], "triton": lambda *a: ["triton says no"],
         "cuda": lambda *a: []},
        auto_order=("triton", "torch"),
    )
    with pytest.raises(BackendError) as info:
        d.select("auto")
    msg = str(info.value)
    assert "torch says no" in msg and "triton says no" in msg
    assert "cuda: not in the auto order" in msg


def test_auto_skips_unverified(monkeypatch):
    from dtop_kernels import backends

    d = Dispatcher("toy", {n: (lambda *a: []) for n in BACKEND_NAMES},
                   auto_order=("triton", "torch"))
    assert d.select("auto") == "torch"  # not in the verification table: the reference only
    with pytest.warns(UserWarning, match="not yet passed"):
        assert d.select("triton") == "triton"
    monkeypatch.setitem(backends.VERIFIED, "toy", ("torch", "triton"))
    assert d.select("auto") == "triton"


def test_registry_lists_the_public_ops():
    from dtop_kernels import backends

    assert set(backends.ops()) == {"gather_tokens", "scatter_tokens", "varlen_attention",
                                   "packed_linear", "pruned_block", "dtop_select"}
    assert set(backends.VERIFIED) == set(backends.ops())
    assert backends.dispatcher("varlen_attention").op == "varlen_attention"
    with pytest.raises(KeyError, match="no op"):
        backends.dispatcher("nope")


def test_dispatcher_requires_every_backend():
    with pytest.raises(ValueError):
        Dispatcher("toy", {"torch": lambda *a: []}, auto_order=("torch",))


# ---------------------------------------------------------------------- side effects
def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DTOP_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


IMPORT_PROBE = """
import sys
import torch
import dtop_kernels
from dtop_kernels import TokenSet, gather_tokens, scatter_tokens, varlen_attention, dtop_select
print("triton_after_import", "triton" in sys.modules)
print("cuda_after_import", torch.cuda.is_initialized())
ts = TokenSet.from_mask(torch.rand(2, 6) > 0.3, capacity=12)
x = torch.randn(2, 6, 8)
p = gather_tokens(x, ts)
scatter_tokens(p, ts, x.clone())
q = torch.randn(12, 2, 4)
varlen_attention(q, q, q, ts.cu_seqlens, ts.cu_seqlens, 6, 6)
dtop_select(torch.randn(2, 3, 2), torch.randn(3, 12), ts, 0.5)
print("cuda_after_ops", torch.cuda.is_initialized())
"""


def test_import_has_no_side_effects():
    res = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True,
                         env=_clean_env(), cwd=ROOT, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    out = dict(line.split() for line in res.stdout.strip().splitlines())
    assert out["triton_after_import"] == "False", "import dtop_kernels must not import triton"
    assert out["cuda_after_import"] == "False", "import dtop_kernels must not initialize CUDA"
    assert out["cuda_after_ops"] == "False", "CPU ops must not initialize CUDA"


def _info(*args: str, **env: str) -> str:
    res = subprocess.run([sys.executable, "-m", "dtop_kernels.info", *args], capture_output=True,
                         text=True, env=dict(_clean_env(), **env), cwd=ROOT, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_info_is_one_line_per_backend():
    """Default: versions, one line per backend saying what runs here or why not, the auto
    choice, and where the details are."""
    # run from a checkout root over an installed package, a note on which one comes first
    # (its line and a blank line)
    out = [ln for ln in _info().splitlines() if ln and not ln.startswith("note: ")]
    assert out[0].startswith(f"dtop_kernels {dtop_kernels.__version__} | python ")
    assert "torch " in out[0] and "GPU: " in out[0]
    lines = {name: next(ln.strip() for ln in out if ln.strip().startswith(name + " "))
             for name in BACKEND_NAMES}
    assert lines["torch"].split(None, 1)[1].startswith("runs every op")
    if not torch.cuda.is_available():
        assert "no: needs a CUDA GPU" in lines["triton"]
        assert lines["cuda"].split(None, 1)[1].startswith("no: ")
        assert 'backend="auto" runs torch for every op on cpu tensors' in out
    assert all(len(ln) <= 300 for ln in lines.values()), lines  # one reason, not one per op
    assert "head dim 8" not in "\n".join(out)
    assert out[-1].endswith("python -m dtop_kernels.info --verbose")
    assert len(out) <= 8


def test_info_verbose_lists_every_op():
    out = _info("--verbose")
    for name in BACKEND_NAMES:
        assert name in out
    for op in ("gather_tokens", "scatter_tokens", "varlen_attention", "pruned_block",
               "dtop_select"):
        assert f"  {op}: auto -> " in out, f"info does not mention {op}"
    assert "head dim 64" in out and "not compiled" not in out


def test_info_under_the_interpreter_says_triton_runs_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: Triton runs there")
    out = _info(TRITON_INTERPRET="1")
    assert "triton  runs on CPU tensors under TRITON_INTERPRET=1" in out


def test_info_names_an_installed_package_shadowed_by_the_source_tree(tmp_path, monkeypatch):
    """Run from a checkout, `python -m dtop_kernels.info` imports the source tree; it must say
    so and describe the installed package instead of reporting the source tree's missing build."""
    import importlib.metadata
    from pathlib import Path

    import dtop_kernels
    from dtop_kernels import info

    class Dist:
        def __init__(self, root: Path) -> None:
            self.root = root

        def locate_file(self, name: str) -> Path:
            return self.root / name

    here = Path(dtop_kernels.__file__).resolve().parent
    installed = tmp_path / "site-packages"
    (installed / "dtop_kernels").mkdir(parents=True)
    (installed / "dtop_kernels" / "__init__.py").write_text("")
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda name=None: [Dist(here.parent), Dist(installed)])
    assert info.shadowed_install() == (installed / "dtop_kernels").resolve()
    monkeypatch.setattr(importlib.metadata, "distributions", lambda name=None: [Dist(here.parent)])
    assert info.shadowed_install() is None


def test_info_and_benchmarks_use_public_names_only():
    """What ``info`` and the benchmarks need is public (``dtop_kernels``' exports): no import of
    the backend packages' internals."""
    import re

    files = [ROOT / "dtop_kernels" / "info.py", *sorted((ROOT / "benchmarks").glob("*.py"))]
    internal = re.compile(r"dtop_kernels\.(backends|cuda|triton)\b|\bdk\.(backends|cuda|triton)\.")
    for f in files:
        hits = [ln for ln in f.read_text().splitlines() if internal.search(ln)]
        assert not hits, f"{f.name} uses backend internals: {hits}"
    for name in ("BACKENDS", "backend_reasons", "auto_backend", "cuda_build_info",
                 "triton_interpreted", "triton_import_error"):
        assert name in dtop_kernels.__all__
