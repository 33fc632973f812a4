"""Run every CUDA kernel once, forward and backward, on small ragged inputs: the workload for
``compute-sanitizer``. Needs a GPU and the built ``dtop_kernels._C``.

    compute-sanitizer --tool memcheck  python tests/sanitize_cuda.py
    compute-sanitizer --tool racecheck python tests/sanitize_cuda.py --only attention linear
    compute-sanitizer --tool initcheck python tests/sanitize_cuda.py

The inputs are ragged on purpose (an image with no tokens, lengths that are not tile
multiples, padding slots past T). Results are compared with the PyTorch backend only loosely,
to catch garbage; exactness is the GPU tests' job (``pytest -m gpu``). Prints one line per
kernel group and exits non-zero on the first mismatch.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
from torch import nn

GROUPS = ("gather", "layernorm", "attention", "linear", "select", "stage")


def _tokens(device, counts=(0, 37, 5, 64), n=64, extra=3):
    from dtop_kernels import TokenSet

    g = torch.Generator().manual_seed(0)
    keep = torch.zeros(len(counts), n, dtype=torch.bool)
    for b, c in enumerate(counts):
        keep[b, torch.randperm(n, generator=g)[:c]] = True
    return TokenSet.from_mask(keep.to(device), capacity=int(keep.sum()) + extra)


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = float((got.float() - want.float()).abs().max()) if got.numel() else 0.0
    if not err <= tol:  # also catches NaN
        raise SystemExit(f"{name}: max error {err:.3g} > {tol:g}")


def _grads(fn, inputs):
    ins = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*ins)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return out.detach(), torch.autograd.grad(out, ins, g)


def check(group: str, dtype: torch.dtype, device, kernel: str = "cuda") -> None:
    """Run ``group``'s kernels on backend ``kernel`` and compare with the torch backend."""
    import dtop_kernels as dk

    t = _tokens(device)
    tol = 0.05 if dtype == torch.float16 else 0.2
    b, n = t.batch_size, t.seq_len
    x = torch.randn(b, n, 128, device=device, dtype=dtype)

    def both(name, fn, inputs):
        got, ggot = _grads(lambda *a: fn(*a, kernel), inputs)
        want, gwant = _grads(lambda *a: fn(*a, "torch"), inputs)
        _close(name, got, want, tol)
        for i, (a, e) in enumerate(zip(ggot, gwant)):
            _close(f"{name} grad {i}", a, e, tol * max(1.0, float(e.abs().max())))

    if group == "gather":
        both("gather_tokens", lambda x, be: dk.gather_tokens(x, t, backend=be), [x])
        p = dk.gather_tokens(x, t, backend="torch")
        for add in (False, True):
            both(f"scatter_tokens add={add}",
                 lambda p, base, be, add=add: dk.scatter_tokens(p, t, base.clone(), add=add,
                                                                backend=be), [p, x])
    elif group == "layernorm":
        from dtop_kernels.ops.layernorm import layer_norm_tokens

        w = torch.randn(128, device=device, dtype=dtype)
        bias = torch.randn(128, device=device, dtype=dtype)
        valid = t.valid_slots()[:, None]
        for gather in (True, False):
            def ln(src, w, bias, be, gather=gather):
                if be != "torch":
                    return layer_norm_tokens(src, w, bias, t, 1e-6, gather=gather,
                                             backend=be)[0]
                rows = dk.gather_tokens(src.view(b, n, 128), t, backend="torch") if gather \
                    else src
                y = nn.functional.layer_norm(rows, (128,), w, bias, 1e-6)
                return torch.where(valid, y, 0.0)

            src = x.reshape(-1, 128) if gather else dk.gather_tokens(x, t, backend="torch")
            both(f"layernorm gather={gather}", ln, [src, w, bias])
    elif group == "attention":
        cu, m = t.cu_seqlens, t.max_seqlen
        for d in (32, 64, 80, 96, 128):
            q, k, v = (torch.randn(t.capacity, 2, d, device=device, dtype=dtype)
                       for _ in range(3))
            both(f"varlen_attention d={d}",
                 lambda q, k, v, be: dk.varlen_attention(q, k, v, cu, cu, m, m, backend=be),
                 [q, k, v])
            kq = 7  # DToP class queries against the tokens: head-mean logits
            cq = torch.arange(b + 1, device=device, dtype=torch.int32) * kq
            qc = torch.randn(b * kq, 2, d, device=device, dtype=dtype)
            _, lg = dk.varlen_attention(qc, k, v, cq, cu, kq, m, return_logits=True,
                                        backend=kernel)
            _, lw = dk.varlen_attention(qc, k, v, cq, cu, kq, m, return_logits=True,
                                        backend="torch")
            _close(f"head-mean logits d={d}", lg, lw, tol * 4)
    elif group == "linear":
        p = dk.gather_tokens(x, t, backend="torch")
        w = torch.randn(264, 128, device=device, dtype=dtype) / 12
        bias = torch.randn(264, device=device, dtype=dtype)
        r = torch.randn(t.capacity, 264, device=device, dtype=dtype)
        base = torch.randn(b, n, 264, device=device, dtype=dtype)
        both("packed_linear gelu",
             lambda p, w, bias, be: dk.packed_linear(p, w, bias, t, activation="gelu",
                                                     backend=be), [p, w, bias])
        both("packed_linear gather+residual+scatter",
             lambda x, w, r, base, be: dk.packed_linear(x, w, None, t, residual=r,
                                                        out=base.clone(), backend=be),
             [x, w, r, base])
        # The CUDA linear picks its tile shape by the GEMM's output width (N <= 1024 or not; for
        # dx: in_features): each shape, forward and dx, with partial N and K tiles. Fewer rows
        # (one row tile either way) keep the wide GEMMs quick under the Triton interpreter.
        ts = _tokens(device, counts=(0, 9, 5), n=16)
        for n_out, k_in in ((1032, 24), (40, 1040)):
            pw = torch.randn(ts.capacity, k_in, device=device, dtype=dtype)
            ww = torch.randn(n_out, k_in, device=device, dtype=dtype) / k_in**0.5
            bw = torch.randn(n_out, device=device, dtype=dtype)
            both(f"packed_linear {k_in} -> {n_out} gelu",
                 lambda p, w, bias, be: dk.packed_linear(p, w, bias, ts, activation="gelu",
                                                         backend=be), [pw, ww, bw])
    elif group == "select":
        kc = 5
        cl = torch.randn(b, kc, 2, device=device, dtype=dtype) * 3
        ml = torch.randn(kc, t.capacity, device=device, dtype=dtype) * 4
        for top_k in (0, 2):
            got = dk.dtop_select(cl, ml, t, 0.6, top_k, backend=kernel)
            want = dk.dtop_select(cl, ml, t, 0.6, top_k, backend="torch")
            if not (torch.equal(got.tokens.cu_seqlens, want.tokens.cu_seqlens)
                    and torch.equal(got.tokens.indices, want.tokens.indices)
                    and torch.equal(got.exited, want.exited)):
                raise SystemExit(f"dtop_select top_k={top_k}: differs from the torch backend")
    elif group == "stage":
        from dtop_kernels.models.vit import Block

        blocks = [Block(128, 2).to(device, dtype).eval() for _ in range(2)]
        both("pruned_stage", lambda x, be: dk.pruned_stage(x, t, blocks, backend=be), [x])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS))
    p.add_argument("--dtype", nargs="+", choices=("fp16", "bf16"), default=["fp16", "bf16"])
    args = p.parse_args(argv)
    from dtop_kernels.cuda import unavailable_reasons

    if not torch.cuda.is_available() or unavailable_reasons():
        print("needs a GPU and the built dtop_kernels._C:",
              "; ".join(unavailable_reasons()) or "no GPU", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*has not yet passed its tests")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    for name in args.dtype:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
        for group in args.only:
            check(group, dtype, dev)
            torch.cuda.synchronize()
            print(f"{group:10s} {name}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
