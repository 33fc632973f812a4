"""Compile every Triton kernel ahead of time for a real GPU target; no GPU needed.

    python tests/compile_kernels.py --arch 90            # the default matrix for sm_90
    python tests/compile_kernels.py --arch 80 --full     # every dtype and head dim
    python tests/compile_kernels.py --resources          # + registers / spills per kernel
    python tests/compile_kernels.py --emit --kernel _score_kernel --dtype float16
                                                         # one kernel's TTIR, TTGIR, PTX (JSON)

The CPU interpreter runs the kernels' logic but not the compiler, which can reject code the
interpreter accepts (types, layouts, shared memory). Each launcher runs once on CPU tensors with
its kernels replaced by recorders, which capture the arguments and the GPU launch settings (tile
sizes, warps, stages) the launcher would use on a GPU; each captured call is compiled to a cubin
with Triton's compiler and the specialization Triton's JIT applies to those arguments (16-byte
aligned pointers, integers divisible by 16, integers equal to 1), so registers, spills and the
instructions chosen (wgmma, cp.async) are those of a real launch. The launches are recorded at
ViT-B/16 shapes (batch 8 at 512 x 512) and at small odd shapes; a variant the JIT would reuse is
compiled once. Must run without TRITON_INTERPRET (tests/test_triton_compile.py runs it in a
subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


class _Recorder:
    def __init__(self, fn, calls: list) -> None:
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.fn, tuple(grid), args, kwargs))
        return launch


def _patch(calls: list) -> None:
    from dtop_kernels.triton import _utils, attention, gather, layernorm, linear, select

    for mod in (_utils, attention, linear, select):  # GPU tile sizes, not the interpreter's
        if hasattr(mod, "interpret_blocks"):
            mod.interpret_blocks = lambda: 0
    _utils.sm_count = lambda device: 132  # grids sized for an H100 / H200 (no GPU queried)
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


def resource_usage(compiled) -> str:
    """Registers, spills and shared memory of a compiled kernel (cuobjdump shipped with
    Triton's NVIDIA backend)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], check=False,
                             capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        return "resource usage unavailable"
    reg, stack, _, local = m.groups()
    ptx = compiled.asm.get("ptx", "")
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
    return (f"regs {reg}, stack {stack} B, local {local} B, shared "
            f"{compiled.metadata.shared} B, warps {compiled.metadata.num_warps}, mma {mma}, "
            f"cp.async {'yes' if 'cp.async' in ptx else 'no'}")


def _record_ops(calls_of, dtype: torch.dtype, t, c: int, heads: int, head_dim: int,
                num_q: int, head_c: int) -> None:
    """One ViT block's launches (LayerNorm, qkv / proj / fc1 / fc2 linears and their weight
    gradients, attention fwd and bwd, gather / scatter) and a DToP head's (head-mean logits, selection) on token set ``t``."""
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


def record_all(dtypes: list[torch.dtype], odd_cases: list[tuple[torch.dtype, list[int]]]
               ) -> list[tuple[str, object, tuple, tuple, dict]]:
    """Recorded launches as (case, kernel, grid, args, kwargs).

    ``vit-b``: ViT-B/16 at 512 x 512, batch 8 (C 768, 12 heads of 64, 1024 tokens per image,
    capacity 8192 with 70% of the tokens active, 150 classes, head width 384): the shapes, strides
    and alignments the benchmarks run, hence the specialization the JIT compiles for them.
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
    vit = TokenSet.from_mask(torch.rand(8, 1024, generator=g) < 0.7, capacity=8 * 1024)
    for dtype in dtypes:
        _record_ops(calls, dtype, vit, 768, 12, 64, 150, 384)
        take("vit-b")
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[0, 25:] = False
    small = TokenSet.from_mask(keep, capacity=80)
    for dtype, head_dims in odd_cases:
        for d in head_dims:
            _record_ops(calls, dtype, small, 2 * d, 2, d, 150, 2 * d)
            take("odd")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--full", action="store_true", help="every dtype x head dims 32..128")
    p.add_argument("--resources", action="store_true", help="print registers / spills")
    p.add_argument("--emit", action="store_true",
                   help="print one kernel's (--kernel, --dtype) TTIR, TTGIR and PTX as JSON")
    p.add_argument("--kernel", help="with --emit: the kernel's name, e.g. _fwd_kernel")
    p.add_argument("--dtype", default="float16", help="with --emit: the inputs' dtype")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    if args.emit:
        asm = compile_one(args.kernel, getattr(torch, args.dtype), args.arch).asm
        print(json.dumps({stage: asm[stage] for stage in ("ttir", "ttgir", "ptx")}))
        return 0
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    odd = [(dt, [32, 64, 80, 128]) for dt in dtypes] if args.full else [(torch.float32, [80])]
    calls = record_all(dtypes, odd)
    kernels = sorted({fn.__name__ for _, fn, _, _, _ in calls})
    seen: set = set()
    t0 = time.perf_counter()
    for case, fn, grid, a, kw in calls:
        key = variant_key(fn, a, kw)
        if key in seen:  # the JIT would reuse the compiled kernel
            continue
        seen.add(key)
        compiled = compile_call(fn, a, kw, args.arch)
        if args.resources:
            dts = sorted({str(v.dtype).replace("torch.", "") for v in a
                          if isinstance(v, torch.Tensor) and v.is_floating_point()})
            shape = ",".join(f"{k.replace('BLOCK_', 'B')}={kw[k]}" for k in kw
                             if k.startswith(("BLOCK", "D")))
            print(f"  {case:5s} {fn.__name__:17s} {'/'.join(dts):16s} {shape:22s} "
                  f"grid {'x'.join(map(str, grid)):11s} {resource_usage(compiled)}")
    print(f"sm_{args.arch}: compiled {len(seen)} variants ({len(calls)} launches) of "
          f"{len(kernels)} kernels ({', '.join(kernels)}) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
