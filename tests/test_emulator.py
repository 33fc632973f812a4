"""The CUDA emulator's checks can fail: known bugs injected into a copy of csrc/ (the sources
themselves stay as they are) are each caught, with a message that names the kernel, the block,
the thread and the place. Run with ``pytest -m emulated``."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import cuda_emulator
import pytest
import torch
from cuda_emulator import KernelFault, build_module

from dtop_kernels import TokenSet
from dtop_kernels.cuda import DTYPE_CODES, _args, load_C
from dtop_kernels.cuda import attention as cuda_attn
from dtop_kernels.cuda import linear as cuda_linear
from dtop_kernels.cuda import select as cuda_select
from dtop_kernels.reference import attention as ref_attn

pytestmark = pytest.mark.emulated  # no build variant: each test loads the build it needs

TESTS = Path(__file__).resolve().parent


def _mutated(variant: str, file: str, old: str, new: str, tag: str) -> str:
    """Path of an emulator build of ``variant`` whose csrc/``file`` has ``old`` replaced by
    ``new`` (once; fails when the text is no longer there, so a bug stays injected)."""
    def mutate(name: str, text: str) -> str:
        if name != file:
            return text
        assert text.count(old) == 1, f"{file} no longer contains the text to mutate: {old!r}"
        return text.replace(old, new)

    return str(build_module(variant, mutate=mutate, tag=tag))


def _run_race(path: str, case) -> None:
    module = cuda_emulator.load("race", path)
    with cuda_emulator.active(module):
        case()


# ---------------------------------------------------------------------- the cases
def attention_case(counts=(130,), d=64, dtype=torch.float16) -> None:
    """Varlen attention forward against float64; 130 keys: three key tiles."""
    g = torch.Generator().manual_seed(0)
    t, h = sum(counts), 2
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    m = max(counts)
    out, _ = cuda_attn.attention_fwd(q, k, v, cu, cu, m, d ** -0.5)
    want = ref_attn.varlen_attention(q.double(), k.double(), v.double(), cu, cu, m, m, d ** -0.5)
    err = float((out.double() - want).abs().max())
    assert err < 2e-3, f"attention error {err:.3g}"


def linear_case(rows=(80, 61), k=64, n=64, dtype=torch.float16) -> None:
    """Packed linear (exact capacity: a row tile reaches past the last row) against float64."""
    keep = torch.zeros(len(rows), max(rows), dtype=torch.bool)
    for i, r in enumerate(rows):
        keep[i, :r] = True
    ts = TokenSet.from_mask(keep)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ts.capacity, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype)
    y, _ = cuda_linear.linear_fwd(x, w, None, ts)
    err = float((y.double() - x.double() @ w.double().t()).abs().max())
    assert err < 5e-2, f"linear error {err:.3g}"


def select_case(threshold: float = 0.5) -> None:
    ts = TokenSet.from_mask(torch.ones(2, 40, dtype=torch.bool))
    g = torch.Generator().manual_seed(2)
    cls = torch.randn(2, 5, 2, generator=g)
    mask = torch.randn(5, ts.capacity, generator=g)
    cuda_select.dtop_select(cls, mask, ts, threshold, 1)


# ---------------------------------------------------------------------- injected bugs
def test_a_removed_barrier_is_a_race():
    path = _mutated("race", "attention_fwd.cu",
                    "    __syncthreads();     // ... and nobody reads V_j any more\n",
                    "\n", "no-barrier")
    with pytest.raises(KernelFault) as e:
        _run_race(path, attention_case)
    msg = str(e.value)
    assert "shared address" in msg and ("race on" in msg or "has not landed" in msg), msg
    assert "attention_fwd_kernel" in msg and "block (" in msg and "thread (" in msg, msg
    assert "attention_fwd.cu:" in msg or "attention.cuh:" in msg, msg  # a source line


def test_a_wait_group_off_by_one_reads_before_the_copy_lands():
    path = _mutated("race", "linear.cu", "    cp_async_wait<kStages - 2>();",
                    "    cp_async_wait<kStages - 1>();", "wait-off-by-one")
    with pytest.raises(KernelFault, match="has not landed") as e:
        _run_race(path, linear_case)
    assert "linear_kernel" in str(e.value) and "cp.async" in str(e.value)


def test_a_wrong_mma_fragment_gives_wrong_results():
    path = _mutated("race", "linear.cu",
                    "attn::mma<T>(acc[mi][2 * np], a[mi], bf[0], bf[1]);",
                    "attn::mma<T>(acc[mi][2 * np], a[mi], bf[0], bf[2]);", "b-fragment")
    with pytest.raises(AssertionError, match="linear error"):
        _run_race(path, linear_case)
    _run_race(str(build_module("race")), linear_case)  # the unmutated kernel passes


def test_a_read_of_uninitialized_shared_memory_is_reported():
    path = _mutated("race", "select.cu",
                    "for (int64_t c = threadIdx.x; c < num_classes; c += kThreads) {",
                    "for (int64_t c = threadIdx.x; c + 1 < num_classes; c += kThreads) {",
                    "uninit-shared")
    with pytest.raises(KernelFault, match="read of uninitialized shared address") as e:
        _run_race(path, select_case)
    assert "select_score_kernel" in str(e.value)


def test_a_barrier_in_divergent_code_is_reported_with_both_sites():
    path = _mutated("race", "select.cu", "    if (cand && better < top_k) {\n",
                    "    if (cand && better < top_k) {\n      __syncthreads();\n", "divergent")
    with pytest.raises(KernelFault, match="divergent __syncthreads") as e:
        _run_race(path, lambda: select_case(threshold=0.0))
    msg = str(e.value)
    assert msg.count("select.cu:") >= 2 and "select_rank_kernel" in msg, msg


def test_a_lane_that_leaves_before_a_warp_collective_is_reported():
    path = _mutated("race", "attention_fwd.cu", "  uint32_t qf[kD / 16][4];\n",
                    "  if (lane == 5) return;\n  uint32_t qf[kD / 16][4];\n", "lane-exits")
    with pytest.raises(KernelFault, match="lane 5 of warp 0 exited before joining ldmatrix"):
        _run_race(path, attention_case)


def test_a_missing_tail_guard_is_an_out_of_bounds_write():
    """The memcheck build (AddressSanitizer) in a subprocess: the report ends the process."""
    path = _mutated("memcheck", "linear.cu", "      if (!col_ok || row >= p.cap) continue;",
                    "      if (!col_ok) continue;", "no-tail-guard")
    code = ("import cuda_emulator as ce, test_emulator as t\n"
            f"m = ce.load('memcheck', {path!r})\n"
            "with ce.active(m):\n    t.linear_case()\n")
    env = dict(os.environ, LD_PRELOAD=cuda_emulator.asan_preload(),
               ASAN_OPTIONS="detect_leaks=0", PYTHONPATH=str(TESTS))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600, cwd=TESTS, check=False)
    assert proc.returncode != 0, "the out-of-bounds write went unnoticed"
    err = proc.stderr
    assert "heap-buffer-overflow" in err and "WRITE" in err, err[-3000:]
    assert "linear.cu:" in err, err[-3000:]  # the kernel's source line in the stack
    assert "emulator: the error above happened in kernel" in err and "linear_kernel" in err, \
        err[-3000:]


def test_shared_memory_above_48_kb_needs_the_opt_in():
    """The linear kernel's narrow tiles take 81 KB of shared memory: without the
    cudaFuncSetAttribute opt-in the launch fails, as on a GPU."""
    path = _mutated("race", "linear.cu", "  attn::allow_smem(kernel, C::kSmemBytes);\n", "\n",
                    "no-smem-opt-in")
    with pytest.raises(RuntimeError, match="cudaErrorInvalidValue"):
        _run_race(path, linear_case)


def test_shared_memory_above_the_device_limit_fails():
    """... and the failure is reported once: the next launch does not find it pending (the
    runtime keeps a failed call's error for cudaGetLastError, which the launch checks read)."""
    small = cuda_emulator.Device(sm=86, sm_count=84, smem_default=48 * 1024,
                                 smem_optin=64 * 1024)
    module = cuda_emulator.load("race")
    with cuda_emulator.active(module, device=small), \
            pytest.raises(RuntimeError, match="cudaErrorInvalidValue"):
        linear_case()
    x = torch.randn(1, 8, 8)
    indices = torch.arange(8, dtype=torch.int32)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    out = torch.empty(8, 8)
    with cuda_emulator.active(module):
        load_C().gather_rows(x.data_ptr(), indices.data_ptr(), cu.data_ptr(), out.data_ptr(), 1,
                             8, 8, 8, DTYPE_CODES[torch.float32], _args.stream(x.device))
    assert torch.equal(out, x[0])


# ---------------------------------------------------------------------- contracts
def test_scatter_add_into_one_row_twice_is_a_race():
    """scatter_rows(add=True) reads, adds and writes each row without atomics: two packed rows
    with one destination race (the contract: distinct indices, csrc/ops.h)."""
    module = cuda_emulator.load("race")
    x = torch.zeros(1, 8, 8)
    packed = torch.ones(8, 8)
    indices = torch.tensor([0, 1, 2, 3, 4, 5, 6, 3], dtype=torch.int32)  # row 3 twice
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with cuda_emulator.active(module), pytest.raises(KernelFault, match="race on global memory"):
        load_C().scatter_rows(packed.data_ptr(), indices.data_ptr(), cu.data_ptr(),
                              x.data_ptr(), 1, 8, 8, 8, DTYPE_CODES[torch.float32], True,
                              _args.stream(x.device))


# ---------------------------------------------------------------------- the count
def test_the_emulated_build_has_the_kernels_of_the_gpu_build(tmp_path):
    """The Y of ``emulated kernels: X of Y`` is what a GPU build has: the emulator's module
    instantiates exactly the kernels of csrc/ that the installed nvcc build has (its sm_80
    cubins, by demangled name; CUB's own scan kernels aside, which the emulator replaces)."""
    import compile_kernels

    pytest.importorskip("triton")  # its NVIDIA backend ships cuobjdump
    if compile_kernels.built_cubins([80], tmp_path) is None:
        pytest.skip("no current nvcc build of the extension here (pip install . builds it)")
    mangled = []
    for cubin in sorted(tmp_path.glob("*.sm_80.cubin")):
        mangled += list(compile_kernels.cubin_usage(cubin.read_bytes()))
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True,
                               text=True, check=True).stdout.split("\n")
    gpu = {name for name in demangled if "dtop::" in name}  # CUB's scan kernels: a stand-in
    emulated = set(cuda_emulator.instantiations(str(build_module("race"))).values())
    assert emulated == gpu, (f"only in the emulator: {sorted(emulated - gpu)[:5]}; "
                             f"only in the GPU build: {sorted(gpu - emulated)[:5]}")
