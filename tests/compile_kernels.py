"""Compile every Triton kernel ahead of time for a real GPU target; no GPU needed.

    python tests/compile_kernels.py --arch 90            # the default matrix for sm_90
    python tests/compile_kernels.py --arch 80 --full     # every dtype and head dim
    python tests/compile_kernels.py --resources          # + registers / spills per kernel

The CPU interpreter runs the kernels' logic but not the compiler, which can reject code the
interpreter accepts (types, layouts, shared memory). Each launcher runs once on CPU tensors with
its kernels replaced by recorders, which capture the arguments and the GPU launch settings (tile
sizes, warps, stages) the launcher would use on a GPU; each captured call is compiled to a cubin
with Triton's compiler. Must run without TRITON_INTERPRET (tests/test_triton_compile.py runs it
in a subprocess).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
        torch.int32: "*i32", torch.int64: "*i64", torch.int8: "*i8"}
_OPTIONS = ("num_warps", "num_stages")


class _Recorder:
    def __init__(self, fn, calls: list) -> None:
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.fn, args, kwargs))
        return launch


def _patch(calls: list) -> None:
    from dtop_kernels.triton import _utils, attention, gather, layernorm, linear, select

    for mod in (_utils, attention, linear, select):  # GPU tile sizes, not the interpreter's
        if hasattr(mod, "interpret_blocks"):
            mod.interpret_blocks = lambda: 0
    for mod in (attention, gather, layernorm, linear, select):
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(mod, name, _Recorder(obj, calls))


def compile_call(fn, args, kwargs, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    values = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items()
                                               if k not in _OPTIONS}
    constexprs, sig = {}, {}
    for i, name in enumerate(fn.arg_names):
        v = values[name]
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
            constexprs[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        else:
            sig[name] = "fp32"
    options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
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
    return (f"regs {reg}, stack {stack} B, local {local} B, shared "
            f"{compiled.metadata.shared} B, warps {compiled.metadata.num_warps}")


def record_all(cases: list[tuple[torch.dtype, list[int]]]) -> list:
    """Run every launcher once per (dtype, head dims) case with recording kernels."""
    from dtop_kernels import TokenSet
    from dtop_kernels.triton import attention as ta
    from dtop_kernels.triton import gather as tg
    from dtop_kernels.triton import layernorm as tln
    from dtop_kernels.triton import linear as tli
    from dtop_kernels.triton import select as tse

    calls: list = []
    _patch(calls)
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[0, 25:] = False
    t = TokenSet.from_mask(keep, capacity=80)
    cu = t.cu_seqlens
    for dtype, head_dims in cases:
        for d in head_dims:
            q = torch.zeros(t.capacity, 2, d, dtype=dtype)
            out, lse = ta.attention_fwd(q, q, q, cu, cu, 40, 0.125)
            ta.attention_bwd(out, q, q, q, out, lse, cu, cu, 40, 40, 0.125)
            ta.head_mean_logits(torch.zeros(300, 2, d, dtype=dtype), q, cu, 150, 40, 0.125)
        c = 768
        x = torch.zeros(80, c, dtype=dtype)
        packed = tg.gather_rows(x, t)
        tg.scatter_rows(packed, t, x, add=True)
        w = torch.ones(c, dtype=dtype)
        tln.layer_norm_fwd(x, w, w, t, 1e-6, gather=True, store_x=True)
        y, _, mean, rstd = tln.layer_norm_fwd(packed, w, w, t, 1e-6)
        tln.layer_norm_bwd(y, packed, w, mean, rstd, t)
        weight = torch.zeros(4 * c, c, dtype=dtype)
        tli.linear_fwd(packed, weight, torch.zeros(4 * c, dtype=dtype), t, tli.ACT_GELU,
                       save_pre=True)
        tli.linear_fwd(torch.zeros(80, 4 * c, dtype=dtype), weight.t().contiguous(), None, t,
                       residual=packed, out=torch.zeros(80, c, dtype=dtype))
        tli.linear_fwd(x, weight, None, t, gather=True, out=torch.zeros(80, 4 * c, dtype=dtype))
        tse.exit_slots(torch.zeros(2, 150, 2, dtype=dtype),
                       torch.zeros(150, 80, dtype=dtype), t, 0.9, 5)
    return calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--full", action="store_true", help="every dtype x head dims 32..128")
    p.add_argument("--resources", action="store_true", help="print registers / spills")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    if args.full:
        calls = record_all([(dt, [32, 64, 80, 128]) for dt in dtypes])
    else:  # the ViT-B/L head dim in the half dtypes; fp32 and head dim 80 once each
        calls = record_all([(torch.float16, [64]), (torch.bfloat16, [64]),
                            (torch.float32, [80])])
    kernels = sorted({fn.__name__ for fn, _, _ in calls})
    t0 = time.perf_counter()
    for fn, a, kw in calls:
        compiled = compile_call(fn, a, kw, args.arch)
        if args.resources:
            dts = sorted({str(v.dtype).replace("torch.", "") for v in a
                          if isinstance(v, torch.Tensor) and v.is_floating_point()})
            shape = {k: kw[k] for k in kw if k.startswith(("BLOCK", "D"))}
            print(f"  {fn.__name__:17s} {'/'.join(dts):9s} {shape}: {resource_usage(compiled)}")
    print(f"sm_{args.arch}: compiled {len(calls)} launches of {len(kernels)} kernels "
          f"({', '.join(kernels)}) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
