"""Deployment: ``dtop-export`` / ``dtop_kernels.export`` to an AOTInductor package with a dynamic
batch, run from a fresh Python process without ``dtop_kernels`` and from the C++ example,
matching the eager model; the errors of what cannot be exported; the export bugs fixed on the
way (each test here failed before its fix)."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dtop_kernels
from dtop_kernels import ExportError, export
from dtop_kernels.deploy import check_package
from dtop_kernels.deploy import main as export_main
from dtop_kernels.models.checkpoint import model_config, save_checkpoint
from dtop_kernels.models.dtop import vit_dtop_tiny
from dtop_kernels.models.vit import resize_pos_embed
from dtop_kernels.ops import native

ROOT = Path(__file__).resolve().parent.parent
# a shared library that defines no dtop:: op
NOT_THE_LIBRARY = str(Path(torch.__file__).resolve().parent / "lib" / "libc10.so")
RES, THRESHOLD = 96, 0.1  # tiny model: a 6 x 6 grid; at 0.1 tokens exit at the first head


@pytest.fixture(scope="module")
def library() -> str:
    try:
        return native.load()
    except native.OpsLibraryError as e:
        if os.environ.get("DTOP_REQUIRE_OPS_LIBRARY"):
            raise
        pytest.skip(f"no op library: {e}")


def _model():
    torch.manual_seed(0)
    return vit_dtop_tiny(threshold=THRESHOLD).eval()


def _image(batch: int) -> torch.Tensor:
    """The examples' deterministic batch: sin(0.001 * i) over the elements in order."""
    shape = (batch, 3, RES, RES)
    return torch.arange(batch * 3 * RES * RES, dtype=torch.float32).mul(0.001).sin() \
        .reshape(shape)


def _expected(batch: int) -> tuple[float, list[int]]:
    """The eager model (the Python reference ops) on the examples' batch: (sum of pred, how
    many tokens exited at each head)."""
    with torch.no_grad():
        out = _model()(_image(batch), mode="packed", backend="torch", tighten=False)
    return out.pred.double().sum().item(), torch.bincount(out.exit_stage.flatten()).tolist()


def _parse(stdout: str) -> tuple[float, list[int]]:
    total = float(re.search(r"^pred: shape .* sum (\S+)$", stdout, re.MULTILINE).group(1))
    counts = re.search(r"^exit_stage: shape .* counts ([\d ]+)$", stdout, re.MULTILINE).group(1)
    return total, [int(c) for c in counts.split()]


@pytest.fixture(scope="module")
def package(library, tmp_path_factory) -> str:
    """One package, written by the dtop-export command from a checkpoint (batch 2 traced), once
    per test run: xdist workers share it through a folder beside their own (the first one to take
    the lock exports, the others wait for it)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # popen-gwN/ in this run's folder
        base = base.parent
    shared = base / "dtop-deploy-package"
    shared.mkdir(exist_ok=True)
    out = shared / "tiny.pt2"
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            ckpt = save_checkpoint(shared / "tiny.ckpt", _model(),
                                   model_config("tiny", 5, threshold=THRESHOLD), 0)
            tmp = shared / "partial.pt2"
            assert export_main([str(ckpt), "--res", str(RES), "--out", str(tmp),
                                "--max-batch", "16"]) == 0
            tmp.rename(out)
    return str(out)


@pytest.mark.parametrize("batch", [1, 3])
def test_package_runs_without_dtop_kernels(package, library, batch):
    """A fresh process with plain torch: the op library, then the package; batch sizes other
    than the traced one from the same package; no 'outdated pt2' warning; dtop_kernels is never
    imported."""
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; "
            "sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0]); "
            "import run_package as r; rc = r.main(sys.argv[1:]); "
            "assert 'dtop_kernels' not in sys.modules, 'dtop_kernels was imported'; "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / "run_package.py"),
                           package, library, str(batch)], capture_output=True, text=True,
                          cwd=Path(package).parent, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "outdated" not in proc.stderr, proc.stderr
    total, counts = _parse(proc.stdout)
    want_total, want_counts = _expected(batch)
    assert counts == want_counts
    assert counts[0] > 0  # tokens did exit early: the select op ran for real
    assert total == pytest.approx(want_total, rel=1e-6)


def test_package_needs_the_library(package):
    """Without the op library the load fails naming the op and the library to load."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import run_package as r; "
            "r.load(sys.argv[2], sys.argv[3])")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples"), package,
                           NOT_THE_LIBRARY], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode != 0
    assert re.search(r"calls dtop::\w+, which .*libc10.so does not define: load the op library",
                     proc.stderr), proc.stderr[-3000:]


def test_package_metadata(package, library):
    meta = dtop_kernels.deploy.package_metadata(package)
    assert meta["dtop_kernels.version"] == dtop_kernels.__version__
    assert meta["dtop_kernels.torch"] == torch.__version__
    assert meta["dtop_kernels.ops_library"] == native.library_version()
    assert set(meta["dtop_kernels.ops"].split(",")) == {"scatter", "select", "varlen_attention"}
    assert meta["dtop_kernels.image"] == f"3,{RES},{RES}"
    assert meta["dtop_kernels.batch"] == "1..16"
    assert check_package(package) == []


def test_cpp_example(package, library, tmp_path):
    """examples/cpp built with CMake against this torch, run on the package: the same numbers."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        if os.environ.get("DTOP_REQUIRE_OPS_LIBRARY"):
            pytest.fail("cmake and a C++ compiler are needed to build examples/cpp")
        pytest.skip("cmake or a C++ compiler is missing")
    build = tmp_path / "build"
    prefix = torch.utils.cmake_prefix_path
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    for cmd in (["cmake", "-S", str(ROOT / "examples" / "cpp"), "-B", str(build), *gen,
                 f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", str(build)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    exe = build / "run_package"
    proc = subprocess.run([str(exe), package, library, "2"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    total, counts = _parse(proc.stdout)
    want_total, want_counts = _expected(2)
    assert counts == want_counts
    assert total == pytest.approx(want_total, rel=1e-6)
    proc = subprocess.run([str(exe), package, NOT_THE_LIBRARY, "2"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 1 and "does not define: load the op library" in proc.stderr


# ---------------------------------------------------------------------- what cannot be exported
def test_export_refuses_before_tracing(tmp_path, library):
    img = torch.randn(2, 3, RES, RES)
    model = _model()
    with pytest.raises(ExportError, match="training mode: call model.eval()"):
        export(model.train(), (img,), tmp_path / "a.pt2")
    model.eval()
    model.tighten = True
    with pytest.raises(ExportError, match="tighten=True.*set model.tighten = False"):
        export(model, (img,), tmp_path / "a.pt2")
    model.tighten = None
    with pytest.raises(ExportError, match="batch size >= 2"):
        export(model, (img[:1],), tmp_path / "a.pt2")
    with pytest.raises(ExportError, match="non-empty tuple of tensors"):
        export(model, (), tmp_path / "a.pt2")
    with pytest.raises(ValueError, match="multiples of the patch size"):  # the model's own check
        export(model, (torch.randn(2, 3, 90, 90),), tmp_path / "a.pt2")
    with pytest.raises(ExportError, match="a CPU or CUDA model"):
        export(_model().to("meta"), (torch.randn(2, 3, RES, RES, device="meta"),),
               tmp_path / "a.pt2")
    with pytest.raises(ExportError, match="put them on one device"):
        export(_model().to("meta"), (img,), tmp_path / "a.pt2")
    assert not (tmp_path / "a.pt2").exists()


def test_tighten_under_torch_export_says_what_to_do():
    """Before: a RecursionError (non-strict) deep inside the read-back."""

    class Tight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = _model()

        def forward(self, img):
            return self.m(img, mode="packed", backend="torch", tighten=True).pred

    with pytest.raises(Exception, match="cannot be exported.*tighten=False") as err:
        torch.export.export(Tight(), (torch.randn(2, 3, RES, RES),), strict=False)
    assert not isinstance(err.value, RecursionError)


def test_dynamic_batch_traces():
    """Before: TokenSet's size check refused a symbolic batch ('batch size must be a
    non-negative int; got s77')."""

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = _model()

        def forward(self, img):
            return self.m(img, mode="packed", backend="torch", tighten=False).pred

    batch = torch.export.Dim("batch", min=1, max=8)
    prog = torch.export.export(Packed(), (torch.randn(2, 3, RES, RES),),
                               dynamic_shapes=({0: batch},), strict=False)
    x = _image(3)
    torch.testing.assert_close(prog.module()(x), Packed()(x))


def test_dynamic_image_size_traces(library):
    """Before: the max_seqlen checks refused a symbolic bound, then the ops' ``int`` sizes
    specialized the image size (the op library's schemas take SymInt)."""
    from dtop_kernels.deploy import PackedForward
    from dtop_kernels.ops import library as ops

    module = PackedForward(_model(), None, "torch")
    dims = {0: torch.export.Dim("b", min=1, max=8),
            2: 16 * torch.export.Dim("h", min=2, max=16),
            3: 16 * torch.export.Dim("w", min=2, max=16)}
    with torch.no_grad(), ops.native_ops():
        prog = torch.export.export(module, (torch.randn(2, 3, RES, RES),),
                                   dynamic_shapes=(dims,), strict=False)
    for size in ((RES, RES), (128, 64)):
        img = torch.randn(3, 3, *size)
        with torch.no_grad():
            got, want = prog.module()(img), module(img)
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(got[1], want[1])


def test_resize_pos_embed_with_a_dynamic_grid():
    """Before: ``src_grid == dst_grid`` on a symbolic grid baked the size into the graph (the
    export of a dynamic image size failed as specialized)."""
    pe = torch.randn(1, 1 + 36, 8)

    class Resize(torch.nn.Module):
        def forward(self, img):
            return resize_pos_embed(pe, (6, 6), (img.shape[-2] // 16, img.shape[-1] // 16))

    h, w = torch.export.Dim("h", min=2, max=64), torch.export.Dim("w", min=2, max=64)
    prog = torch.export.export(Resize(), (torch.randn(1, 3, 96, 96),),
                               dynamic_shapes=({2: 16 * h, 3: 16 * w},), strict=False)
    for size in ((96, 96), (128, 64)):
        img = torch.randn(1, 3, *size)
        torch.testing.assert_close(prog.module()(img), Resize()(img), atol=1e-6, rtol=1e-6)


def test_export_command_errors(capsys):
    with pytest.raises(SystemExit):
        export_main(["--res", "96", "--out", "x.pt2"])  # neither a checkpoint nor --arch
    assert "give a checkpoint or --arch" in capsys.readouterr().err


# ---------------------------------------------------------------------- ONNX (docs/deploy.md)
def _onnx_error(module, args, tmp_path) -> str:
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript")
    with pytest.raises(Exception) as err, torch.no_grad():
        torch.onnx.export(module, args, str(tmp_path / "m.onnx"), dynamo=True)
    return str(err.value)


def test_onnx_stops_at_the_pruning_ops(library, tmp_path):
    from dtop_kernels.deploy import PackedForward
    from dtop_kernels.ops import library as ops

    with ops.native_ops():
        msg = _onnx_error(PackedForward(_model(), None, "torch"),
                          (torch.randn(2, 3, RES, RES),), tmp_path)
    assert re.search(r"No ONNX function found for .*op='dtop\.\w+'", msg), msg[-2000:]


def test_onnx_stops_at_searchsorted_on_plain_aten_ops(tmp_path):
    from dtop_kernels import TokenSet
    from dtop_kernels.reference import select as ref

    class Select(torch.nn.Module):
        def forward(self, cls, mask, idx, cu):
            new, exited = ref.dtop_select(cls, mask, TokenSet(idx, cu, 2, 8, 8), 0.5, 1)
            return new.indices, new.cu_seqlens, exited

    ts = TokenSet.from_mask(torch.rand(2, 8, generator=torch.Generator().manual_seed(0)) < 0.7,
                            capacity=16)
    msg = _onnx_error(Select(), (torch.randn(2, 3, 2), torch.randn(3, 16), ts.indices,
                                 ts.cu_seqlens), tmp_path)
    assert "No ONNX function found for <OpOverload(op='aten.searchsorted'" in msg, msg[-2000:]


# ---------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
def test_export_on_gpu_matches_eager(backend, library, tmp_path):
    """A float16 model on the GPU exported on each backend (the op library's CUDA kernels, or the
    triton_ops compiled into the package), run at batch 1 and 3 from one package, against the
    eager packed forward on the same backend."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not native.has_cuda_kernels():
        pytest.fail(f"{library} has no CUDA kernels: build the package with nvcc against a CUDA "
                    "build of torch")
    from torch._inductor import aoti_load_package

    torch.manual_seed(0)  # head width 64: head dim 32, which the CUDA attention kernels take
    model = vit_dtop_tiny(threshold=THRESHOLD, head_width=64, head_attn_drop=0.0)
    model = model.to("cuda", torch.float16).eval()
    path = export(model, (_image(2).to("cuda", torch.float16),), tmp_path / "gpu.pt2",
                  backend=backend, max_batch=8)
    runner = aoti_load_package(path)
    for batch in (1, 3):
        img = _image(batch).to("cuda", torch.float16)
        with torch.no_grad():
            pred, stage = runner(img)
            want = model(img, mode="packed", backend=backend, tighten=False)
        torch.testing.assert_close(pred.float(), want.pred.float(), atol=2e-2, rtol=2e-2)
        agree = (stage == want.exit_stage).float().mean().item()
        assert agree > 0.97, f"{backend}, batch {batch}: exit stages agree on {agree:.1%}"
