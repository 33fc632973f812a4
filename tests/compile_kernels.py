"""Compile every kernel ahead of time for real GPU targets and gate their resources; no GPU needed.

    python tests/compile_kernels.py --arch 90            # the default matrix for sm_90
    python tests/compile_kernels.py --arch 80 --full     # every dtype and head dim
    python tests/compile_kernels.py --resources          # + registers / spills per kernel
    python tests/compile_kernels.py --arch 80 --arch 90 --gate              # the resource gate
    python tests/compile_kernels.py --kernels cuda --arch 80 --arch 90 --gate   # csrc/*.cu
    python tests/compile_kernels.py --kernels triton cuda --arch 80 --arch 90 --gate \
        --markdown docs/resources.md                     # the table of docs/resources.md
    python tests/compile_kernels.py --emit --kernel _score_kernel --dtype float16
                                                         # one kernel's TTIR, TTGIR, PTX (JSON)

The CPU interpreter runs the kernels' logic but not the compiler, which can reject code the
interpreter accepts (types, layouts, shared memory). Each launcher runs once on CPU tensors with
its kernels replaced by recorders, which capture the arguments and the GPU launch settings (tile
sizes, warps, stages) the launcher would use on a GPU; each captured call is compiled to a cubin
with Triton's compiler and the specialization Triton's JIT applies to those arguments (16-byte
aligned pointers, integers divisible by 16, integers equal to 1), so registers, spills and the
instructions chosen (wgmma, cp.async) are those of a real launch. The launches are recorded at
ViT-B/16 and ViT-L/16 shapes (batch 8 at 512 and 640 px) and at small odd shapes; a variant the
JIT would reuse is compiled once. The CUDA kernels are compiled with nvcc (device code only).
Registers, stack and static shared memory come from cuobjdump, spill stores from the SASS.
``--gate`` fails on any spill or shared memory above the architecture's limit (``Usage``). Must
run without TRITON_INTERPRET (tests/test_triton_compile.py runs it in subprocesses).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


class _Recorder:
    def __init__(self, fn, calls: list) -> None:
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.fn, tuple(grid), args, kwargs))
        return launch


def _patch(calls: list) -> None:
    from dtop_kernels import _gpu
    from dtop_kernels.triton import _utils, attention, gather, layernorm, linear, select

    for mod in (_utils, attention, linear, select):  # GPU tile sizes, not the interpreter's
        if hasattr(mod, "interpret_blocks"):
            mod.interpret_blocks = lambda: 0
    _gpu.sm_count = lambda device: 132  # grids sized for an H100 / H200 (no GPU queried)
    for mod in (attention, gather, layernorm, linear, select):
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(mod, name, _Recorder(obj, calls))


def compile_call(fn, args, kwargs, arch: int):
    """Compile one recorded launch for sm_<arch> with the specialization Triton's JIT would
    apply to these arguments on a GPU: its own binder decides which pointers are 16-byte
    aligned and which integers are divisible by 16 (``tt.divisibility``) or equal to 1
    (constants), as at a real launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=backend.target, options=options.__dict__)
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{fn.__name__}: no cubin")
    return compiled


# Shared memory per block: dynamic (opt-in) and static, per architecture.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
STATIC_SMEM_LIMIT = 48 * 1024
GATED_DTYPES = ("fp16", "bf16")  # the fp32 path's dK/dV spills by design (triton/attention.py)
CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVIDIA_BIN = "backends/nvidia/bin"  # cuobjdump, shipped with Triton's NVIDIA backend


@dataclass
class Usage:
    """Compiled resources of one kernel variant for one architecture."""

    kernel: str
    arch: int
    case: str  # "vit-b fp16", "odd fp32", "csrc/linear.cu"
    head_dim: str
    regs: int
    stack: int  # bytes of stack frame (local memory) per thread
    spill_bytes: int  # bytes stored to local memory (STL in the SASS): spill stores
    smem: int  # dynamic (Triton) or static (CUDA) shared memory per block, bytes
    mma: str  # "wgmma", "mma.sync" or "-"
    gated: bool = True

    def problems(self) -> list[str]:
        """Why this variant fails the gate (empty when it passes or is not gated)."""
        if not self.gated:
            return []
        out = []
        if self.spill_bytes or self.stack:
            out.append(f"spills ({self.spill_bytes} B stored, {self.stack} B stack)")
        limit = STATIC_SMEM_LIMIT if self.case.startswith("csrc/") else SMEM_LIMIT[self.arch]
        if self.smem > limit:
            out.append(f"shared memory {self.smem} B above sm_{self.arch}'s {limit} B")
        return out


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / NVIDIA_BIN / name)


def cubin_usage(cubin: bytes) -> dict[str, tuple[int, int, int, int]]:
    """Per function of a cubin: (registers, stack bytes, static shared bytes, spill-store
    bytes), from cuobjdump's resource usage and the STL instructions of its SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res, sass = (subprocess.run([_tool("cuobjdump"), flag, f.name], check=True,
                                    capture_output=True, text=True).stdout
                     for flag in ("--dump-resource-usage", "-sass"))
    usage = {m[1]: [int(m[2]), int(m[3]), int(m[4]), 0] for m in re.finditer(
        r"Function ([^:\s]+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+)", res)}
    name = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m[1]
        m = re.search(r"\bSTL(?:\.(64|128|U8|S8|U16|S16))?\s", line)
        if m and name in usage:
            usage[name][3] += {"64": 8, "128": 16, "U8": 1, "S8": 1, "U16": 2, "S16": 2}.get(
                m[1], 4)
    return {k: tuple(v) for k, v in usage.items()}


def _mma(ptx: str) -> str:
    return "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-"


def triton_usage(compiled, arch: int, case: str, kwargs: dict) -> Usage:
    """The resources of one compiled Triton kernel (its cubin holds that one function)."""
    (regs, stack, _, spill), = cubin_usage(compiled.asm["cubin"]).values()
    return Usage(compiled.metadata.name, arch, case, str(kwargs.get("D", "-")), regs, stack,
                 spill, compiled.metadata.shared, _mma(compiled.asm.get("ptx", "")),
                 gated=case.split()[-1] in GATED_DTYPES)


def _short(name: str) -> str:
    """A readable name for a mangled CUDA kernel (c++filt where installed)."""
    filt = shutil.which("c++filt")
    if filt:
        name = subprocess.run([filt, name], capture_output=True, text=True,
                              check=True).stdout.strip()
    name = re.sub(r"^void |dtop::|\(anonymous namespace\)::|attn::", "", name)
    name = re.sub(r"\([^()]*\)$", "", name)  # the parameter list
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    return name if len(name) < 90 else name[:name.index("<")] + "<...>"  # CUB's templates


def nvcc_command(src: Path, arch: int, out: Path) -> list[str]:
    """Device-only compile of one source to a cubin, with CMakeLists.txt's flags for the
    kernels (Release: -O3 -DNDEBUG; -lineinfo; C++17; csrc/ included)."""
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc") or "nvcc"
    return [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-DNDEBUG", "-std=c++17", "-lineinfo",
            f"-I{CSRC}", "-o", str(out), str(src)]


def built_cubins(archs: list[int], tmp: Path) -> Path | None:
    """The cubins of the built extension (dtop_kernels/_C*.so of the imported package) for
    every csrc/*.cu and arch, extracted into ``tmp`` (cuobjdump -xelf names them
    ``SOURCE.sm_ARCH.cubin``): the module's path; None when there is no built module, one older than a file of
    csrc/ (stale), or one that lacks a source or an arch."""
    import dtop_kernels

    built = sorted(Path(dtop_kernels.__file__).resolve().parent.glob("_C*.so"))
    if not built:
        return None
    newest_source = max(f.stat().st_mtime for f in CSRC.rglob("*") if f.is_file())
    if built[0].stat().st_mtime < newest_source:
        return None
    subprocess.run([_tool("cuobjdump"), "-xelf", "all", str(built[0])], cwd=tmp, check=True,
                   capture_output=True)
    want = [Path(tmp) / f"{src.stem}.sm_{arch}.cubin"
            for arch in archs for src in sorted(CSRC.glob("*.cu"))]
    return built[0] if all(c.is_file() for c in want) else None


def cuda_usages(archs: list[int], jobs: int, built: bool = False) -> list[Usage]:
    """Every CUDA kernel of csrc/*.cu for each arch: with ``built``, read from the built
    extension when it is there, current and complete (:func:`built_cubins`), else compiled
    with nvcc (``jobs`` at a time)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        todo = [(src, arch, Path(tmp) / f"{src.stem}.sm_{arch}.cubin")
                for arch in archs for src in sorted(CSRC.glob("*.cu"))]
        found = built_cubins(archs, Path(tmp)) if built else None
        if found is not None:
            print(f"CUDA kernels: read from the built module {found}")
            todo_compile = []
        else:
            if built:
                print("CUDA kernels: no built module here that is current and complete: "
                      "compiling csrc/ with nvcc")
            todo_compile = todo
        running: list = []
        for i, (src, arch, cubin) in enumerate(todo_compile):
            running.append(subprocess.Popen(nvcc_command(src, arch, cubin),
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True))
            if len(running) < jobs and i + 1 < len(todo_compile):
                continue
            for proc in running:
                log, _ = proc.communicate()
                if proc.returncode:
                    raise RuntimeError(f"nvcc failed: {' '.join(proc.args)}\n{log}")
            running = []
        for src, arch, cubin in todo:
            for name, (regs, stack, smem, spill) in cubin_usage(cubin.read_bytes()).items():
                kernel = _short(name)
                # template arguments: <dtype, head dim> (attention), <dtype, ...> (others)
                m = re.match(r"\w+<(fp16|bf16|float)(?:, (\d+)>)?", kernel)
                dtype = f" {m[1].replace('float', 'fp32')}" if m else ""
                head_dim = m[2] if m and m[2] and kernel.startswith("attention") else "-"
                out.append(Usage(kernel, arch, f"csrc/{src.name}{dtype}", head_dim, regs, stack,
                                 spill, smem, "-"))
    return out


def markdown(usages: list[Usage], versions: str) -> str:
    """docs/resources.md: how the figures were made and the table of them."""
    lines = [
        "# Compiled resources of every kernel (static gate)", "",
        ("Generated by `python tests/compile_kernels.py --kernels triton cuda --arch 80 --arch 90 "
         "--gate --markdown docs/resources.md` (no GPU needed); CI runs the same gate in "
         "tests/test_triton_compile.py."), "",
        f"Compiled on {versions}.", "",
        ("- Triton: each launch the launchers make at ViT-B/16 (512 px, batch 8) and ViT-L/16 "
         "(640 px, batch 8) shapes, plus a small ragged shape at head dim 80 in fp32, compiled "
         "with the JIT's specialization for those arguments; a variant the JIT would reuse is "
         "listed once, under the first case that compiles it (every ViT-L launch reuses a ViT-B "
         "variant). Shared memory: the dynamic shared memory Triton requests."),
        ("- CUDA: every kernel instantiated in csrc/*.cu, compiled with nvcc -cubin and the "
         "kernels' flags of CMakeLists.txt. Shared memory: static (on sm_90 it includes 1 KB "
         "the system reserves per block); the dynamic shared memory of attention and linear is "
         "checked at compile time against 99 KB by static_asserts in the sources."),
        ("- Spill stores: bytes stored to local memory (STL instructions in the SASS); stack: "
         "the stack frame (cuobjdump --dump-resource-usage)."),
        (f"- The gate fails on any spill or stack frame, and on shared memory above sm_80's "
         f"{SMEM_LIMIT[80] // 1024} KB or sm_90's {SMEM_LIMIT[90] // 1024} KB per block "
         f"(CUDA's static shared memory: {STATIC_SMEM_LIMIT // 1024} KB); fp32 Triton variants "
         "are listed but not gated (their dK/dV kernel spills by design, "
         "dtop_kernels/triton/attention.py)."), "",
        ("| kernel | arch | case | dtype | head dim | registers | spill stores (B) | stack (B) "
         "| shared (B) | mma | gate |"), "|" + " --- |" * 11]
    for u in usages:
        gate = "; ".join(u.problems()) or ("pass" if u.gated else "not gated")
        case, _, dtype = u.case.partition(" ")
        lines.append(f"| `{u.kernel}` | sm_{u.arch} | {case} | {dtype or '-'} | {u.head_dim} | "
                     f"{u.regs} | {u.spill_bytes} | {u.stack} | {u.smem} | {u.mma} | {gate} |")
    return "\n".join(lines) + "\n"


def _record_ops(calls_of, dtype: torch.dtype, t, c: int, heads: int, head_dim: int,
                num_q: int, head_c: int) -> None:
    """One ViT block's launches (LayerNorm, qkv / proj / fc1 / fc2 linears and their weight
    gradients, attention fwd and bwd, gather / scatter) and a DToP head's (head-mean logits,
    selection) on token set ``t``."""
    from dtop_kernels.triton import attention as ta
    from dtop_kernels.triton import gather as tg
    from dtop_kernels.triton import layernorm as tln
    from dtop_kernels.triton import linear as tli
    from dtop_kernels.triton import select as tse

    cap, rows, cu = t.capacity, t.batch_size * t.seq_len, t.cu_seqlens
    dense = torch.empty(rows, c, dtype=dtype)
    w_ln = torch.empty(c, dtype=dtype)
    normed, packed, mean, rstd = tln.layer_norm_fwd(dense, w_ln, w_ln, t, 1e-6, gather=True,
                                                    store_x=True)
    tln.layer_norm_bwd(normed, packed, w_ln, mean, rstd, t)
    w_qkv, b_qkv = torch.empty(3 * c, c, dtype=dtype), torch.empty(3 * c, dtype=dtype)
    qkv, _ = tli.linear_fwd(normed, w_qkv, b_qkv, t)
    q, k, v = qkv.view(cap, 3, heads, head_dim).unbind(1)  # views, as in pruned_block
    o, lse = ta.attention_fwd(q, k, v, cu, cu, t.max_seqlen, head_dim**-0.5)
    ta.attention_bwd(o, q, k, v, o, lse, cu, cu, t.max_seqlen, t.max_seqlen, head_dim**-0.5)
    o = o.reshape(cap, c)
    w_proj = torch.empty(c, c, dtype=dtype)
    tli.linear_fwd(o, w_proj, b_qkv[:c], t, residual=packed)
    w_fc1, b_fc1 = torch.empty(4 * c, c, dtype=dtype), torch.empty(4 * c, dtype=dtype)
    h, _ = tli.linear_fwd(normed, w_fc1, b_fc1, t, tli.ACT_GELU, save_pre=True)
    tli.linear_fwd(h, torch.empty(c, 4 * c, dtype=dtype), b_qkv[:c], t, residual=packed,
                   out=dense)  # the stage's last GEMM scatters
    tli.linear_fwd(dense, w_qkv, b_qkv, t, gather=True)  # the stage's first GEMM gathers
    tli.linear_bwd_weight(h, normed, t, need_db=True)  # fc1's dW and db
    tli.linear_bwd_weight(qkv, dense, t, gather=True, need_db=True)  # gathered rows
    tli.linear_bwd_weight(h, normed, t, need_dw=False, need_db=True)  # db alone
    tg.scatter_rows(tg.gather_rows(dense, t), t, dense, add=True)
    b = t.batch_size
    hq = torch.empty(b * num_q, head_c // head_dim, head_dim, dtype=dtype)
    hk = torch.empty(cap, head_c // head_dim, head_dim, dtype=dtype)
    ta.head_mean_logits(hq, hk, cu, num_q, t.max_seqlen, head_dim**-0.5)
    tse.exit_slots(torch.empty(b, num_q, 2, dtype=dtype), torch.empty(num_q, cap, dtype=dtype),
                   t, 0.9, 5)


DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def record_all(dtypes: list[torch.dtype], odd_cases: list[tuple[torch.dtype, list[int]]]
               ) -> list[tuple[str, object, tuple, tuple, dict]]:
    """Recorded launches as (case, kernel, grid, args, kwargs); case: shape and dtype, e.g.
    "vit-b fp16".

    ``vit-b``: ViT-B/16 at 512 x 512, batch 8 (C 768, 12 heads of 64, 1024 tokens per image,
    capacity 8192 with 70% of the tokens active, 150 classes, head width 384): the shapes, strides
    and alignments the benchmarks run, hence the specialization the JIT compiles for them.
    ``vit-l``: ViT-L/16 at 640 x 640, batch 8 (C 1024, 16 heads of 64, 1600 tokens per image,
    head width 512), fp16 and bf16 only.
    ``odd``: small ragged shapes (capacity 80, 2 heads, odd head dims) for coverage.
    """
    from dtop_kernels import TokenSet

    calls: list = []
    _patch(calls)
    out = []

    def take(case: str) -> None:
        out.extend((case, *call) for call in calls)
        calls.clear()

    g = torch.Generator().manual_seed(0)
    for name, n, c, heads, head_c, types in (
            ("vit-b", 1024, 768, 12, 384, dtypes),
            ("vit-l", 1600, 1024, 16, 512, [d for d in dtypes if d != torch.float32])):
        tokens = TokenSet.from_mask(torch.rand(8, n, generator=g) < 0.7, capacity=8 * n)
        for dtype in types:
            _record_ops(calls, dtype, tokens, c, heads, 64, 150, head_c)
            take(f"{name} {DTYPE_NAMES[dtype]}")
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[0, 25:] = False
    small = TokenSet.from_mask(keep, capacity=80)
    for dtype, head_dims in odd_cases:
        for d in head_dims:
            _record_ops(calls, dtype, small, 2 * d, 2, d, 150, 2 * d)
            take(f"odd {DTYPE_NAMES[dtype]}")
    return out


def compile_one(kernel: str, dtype: torch.dtype, arch: int):
    """The first launch of ``kernel`` recorded at ViT-B shapes in ``dtype``, compiled for
    sm_<arch>."""
    for _, fn, _, a, kw in record_all([dtype], []):
        if fn.__name__ == kernel:
            return compile_call(fn, a, kw, arch)
    raise ValueError(f"no launch of {kernel} recorded")


def variant_key(fn, args, kwargs) -> tuple:
    """What Triton's JIT caches a compiled kernel under for these arguments (its own binder's
    specialization, the same on any GPU of one architecture)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params,
                                            make_backend(GPUTarget("cuda", 90, 32)))
    _, specialization, options = binder(*args, **kwargs)
    return fn.__name__, str(specialization), str(sorted(options.items()))


def _versions() -> str:
    import triton

    nvcc = shutil.which("nvcc")
    cuda = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                          check=False).stdout.strip().splitlines()[-1] if nvcc else "no nvcc"
    return (f"{datetime.date.today().isoformat()}; triton {triton.__version__}, "
            f"torch {torch.__version__}, nvcc {cuda}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append",
                   help="compute capability, e.g. 80 or 90; repeat for several (default 90)")
    p.add_argument("--kernels", nargs="+", choices=["triton", "cuda"], default=["triton"],
                   help="which kernels: Triton's (recorded launches) and / or csrc/*.cu (nvcc)")
    p.add_argument("--full", action="store_true", help="every dtype x head dims 32..128")
    p.add_argument("--resources", action="store_true", help="print registers / spills")
    p.add_argument("--emit", action="store_true",
                   help="print one kernel's (--kernel, --dtype) TTIR, TTGIR and PTX as JSON")
    p.add_argument("--kernel", help="with --emit: the kernel's name, e.g. _fwd_kernel")
    p.add_argument("--dtype", default="float16", help="with --emit: the inputs' dtype")
    p.add_argument("--gate", action="store_true",
                   help="fail on any spill (fp16 / bf16 Triton variants, every CUDA kernel) or "
                        "shared memory above the architecture's limit")
    p.add_argument("--markdown", type=Path, help="write the resource table to this file")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="nvcc processes at once")
    p.add_argument("--built", action="store_true",
                   help="read the CUDA kernels from the built extension (dtop_kernels/_C) when "
                        "it is there and newer than csrc/, instead of compiling them")
    args = p.parse_args(argv)
    archs = args.arch or [90]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    if args.emit:
        asm = compile_one(args.kernel, getattr(torch, args.dtype), archs[0]).asm
        print(json.dumps({stage: asm[stage] for stage in ("ttir", "ttgir", "ptx")}))
        return 0
    usages: list[Usage] = []
    t0 = time.perf_counter()
    if "triton" in args.kernels:
        dtypes = [torch.float16, torch.bfloat16, torch.float32]
        odd = [(dt, [32, 64, 80, 128]) for dt in dtypes] if args.full else [(torch.float32, [80])]
        calls = record_all(dtypes, odd)
        kernels = sorted({fn.__name__ for _, fn, _, _, _ in calls})
        for arch in archs:
            seen: set = set()
            for case, fn, grid, a, kw in calls:
                key = variant_key(fn, a, kw)
                if key in seen:  # the JIT would reuse the compiled kernel
                    continue
                seen.add(key)
                compiled = compile_call(fn, a, kw, arch)
                u = triton_usage(compiled, arch, case, kw)
                usages.append(u)
                if args.resources:
                    shape = ",".join(f"{k.replace('BLOCK_', 'B')}={kw[k]}" for k in kw
                                     if k.startswith(("BLOCK", "D")))
                    ptx = compiled.asm.get("ptx", "")
                    print(f"  {case:10s} {fn.__name__:17s} {shape:24s} grid "
                          f"{'x'.join(map(str, grid)):11s} regs {u.regs}, spill stores "
                          f"{u.spill_bytes} B, stack {u.stack} B, shared {u.smem} B, warps "
                          f"{compiled.metadata.num_warps}, mma {u.mma}, cp.async "
                          f"{'yes' if 'cp.async' in ptx else 'no'}")
            print(f"sm_{arch}: compiled {len(seen)} variants ({len(calls)} launches) of "
                  f"{len(kernels)} kernels ({', '.join(kernels)}) in "
                  f"{time.perf_counter() - t0:.0f} s")
    if "cuda" in args.kernels:
        cuda = cuda_usages(archs, max(1, args.jobs), built=args.built)
        usages += cuda
        if args.resources:
            for u in cuda:
                print(f"  sm_{u.arch} {u.case:24s} {u.kernel}: regs {u.regs}, spill stores "
                      f"{u.spill_bytes} B, stack {u.stack} B, static shared {u.smem} B")
        print(f"checked {len(cuda)} CUDA kernels of csrc/ for "
              f"{', '.join(f'sm_{a}' for a in archs)} in {time.perf_counter() - t0:.0f} s")
    if args.markdown:
        args.markdown.write_text(markdown(usages, _versions()))
        print(f"wrote {args.markdown}")
    bad = [(u, why) for u in usages for why in u.problems()]
    for u, why in bad:
        print(f"GATE: {u.kernel} sm_{u.arch} {u.case} head dim {u.head_dim}: {why}")
    if args.gate:
        print(f"resource gate: {len(bad)} problems in {len(usages)} variants")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
