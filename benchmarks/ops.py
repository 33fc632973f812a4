"""Per-op benchmarks on the ViT-DToP shapes: every backend that can run here, against baselines.

    python benchmarks/ops.py                     # ViT-B at 512 (N = 1024, C = 768, H = 12)
    python benchmarks/ops.py --model large --res 640 --batch 4 --json
    python benchmarks/ops.py --quick             # tiny shapes, few repeats (smoke test)

Derived figures (formulas):
- memory-bound ops: GB/s = bytes moved / time; bytes are counted per op below; "% copy" is that
  against a device-to-device copy of the same number of bytes (``dst.copy_(src)``) measured here.
- attention: FLOPs = 4 * H * D * sum_b(nq_b * nk_b) forward (two GEMMs), x 2.5 for backward;
  the dense baseline runs SDPA on a rectangular batch with the same total token count.
- linear: FLOPs = 2 * T * K * N with T the active rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_json_path, environment, format_table, header, time_fn, write_json

import dtop_kernels as dk
from dtop_kernels.backends import BACKENDS, BackendError

SHAPES = {"base": (768, 12), "large": (1024, 16)}


def _counts(b: int, n: int, keep: float) -> list[int]:
    """Per-image active counts spread around ``keep * n`` (images prune differently)."""
    if b == 1:
        return [round(keep * n)]
    lo, hi = max(0.0, keep - 0.2), min(1.0, keep + 0.2)
    return [round(n * (lo + (hi - lo) * i / (b - 1))) for i in range(b)]


def _tokens(b: int, n: int, keep: float, device) -> dk.TokenSet:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, c in enumerate(_counts(b, n, keep)):
        mask[i, torch.randperm(n, generator=g)[:c]] = True
    return dk.TokenSet.from_mask(mask.to(device))


def _backends(fn) -> list[str]:
    """The backends that can run ``fn(backend)`` here (runs it once each)."""
    ok = []
    for be in BACKENDS:
        try:
            fn(be)
            ok.append(be)
        except BackendError:
            pass
    return ok


def bench(args) -> tuple[dict, list[dict]]:
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    env = environment(dtype, dev)
    c, h = SHAPES[args.model]
    n = (args.res // 16) ** 2
    b = args.batch
    if args.quick:
        c, h, n, b = 64, 2, 64, 2
    d = c // h
    t = _tokens(b, n, args.keep, dev)
    total = int(t.cu_seqlens[-1])  # benchmark setup: one host read is fine here
    seqlens = t.seqlens.tolist()
    rows: list[dict] = []
    tm = lambda fn: time_fn(fn, dev, warmup=args.warmup, repeats=args.repeats)
    esize = torch.empty((), dtype=dtype).element_size()

    def add(op, impl, timing, flops=None, nbytes=None, copy_gbs=None, note=None):
        row = {"op": op, "impl": impl, "T": total, "B": b, "N": n, "C": c, **timing}
        if flops is not None:
            row["tflops"] = flops / timing["ms"] / 1e9
        if nbytes is not None:
            row["gbs"] = nbytes / timing["ms"] / 1e6
            if copy_gbs:
                row["pct_copy"] = 100 * row["gbs"] / copy_gbs
        if note:
            row["note"] = note
        rows.append(row)

    # --- copy baseline
    src = torch.randn(total, c, device=dev, dtype=dtype)
    dst = torch.empty_like(src)
    cp = tm(lambda: dst.copy_(src))
    copy_bytes = 2 * src.numel() * esize
    add("copy", "torch copy_", cp, nbytes=copy_bytes)
    copy_gbs = rows[-1]["gbs"]

    x = torch.randn(b, n, c, device=dev, dtype=dtype)
    moved = 2 * total * c * esize + 4 * total  # read + write rows, read indices
    for be in _backends(lambda be: dk.gather_tokens(x, t, backend=be)):
        add("gather_tokens", be, tm(lambda be=be: dk.gather_tokens(x, t, backend=be)),
            nbytes=moved, copy_gbs=copy_gbs)
    packed = dk.gather_tokens(x, t, backend="torch")
    out = x.clone()
    for be in _backends(lambda be: dk.scatter_tokens(packed, t, out, backend=be)):
        add("scatter_tokens", be,
            tm(lambda be=be: dk.scatter_tokens(packed, t, out, backend=be)),
            nbytes=moved, copy_gbs=copy_gbs)
    ln = torch.nn.LayerNorm(c, eps=1e-6, device=dev, dtype=dtype)
    flat = x.reshape(-1, c)
    idx = t.indices.long()
    add("gather+layernorm", "torch index_select+layer_norm",
        tm(lambda: ln(flat.index_select(0, idx))), nbytes=moved, copy_gbs=copy_gbs)
    if dev.type == "cuda":
        from dtop_kernels.cuda import unavailable_reasons
        from dtop_kernels.ops.layernorm import layer_norm_tokens

        kernels = [be for be, ok in (("triton", dk.backends.triton_import_error() is None),
                                     ("cuda", not unavailable_reasons())) if ok]
        for be in kernels:
            add("gather+layernorm", f"{be} fused",
                tm(lambda be=be: layer_norm_tokens(flat, ln.weight, ln.bias, t, 1e-6,
                                                   gather=True, backend=be)),
                nbytes=moved, copy_gbs=copy_gbs)

    # --- attention
    q = torch.randn(total, h, d, device=dev, dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    fl = 4 * h * d * sum(s * s for s in seqlens)
    cu, m = t.cu_seqlens, t.max_seqlen
    for be in _backends(lambda be: dk.varlen_attention(q, k, v, cu, cu, m, m, backend=be)):
        add("attention fwd", f"varlen {be}",
            tm(lambda be=be: dk.varlen_attention(q, k, v, cu, cu, m, m, backend=be)), fl)
    nd = max(1, total // b)
    qd = torch.randn(b, h, nd, d, device=dev, dtype=dtype)
    add("attention fwd", f"dense SDPA [{b}, {nd}] (same T)",
        tm(lambda: F.scaled_dot_product_attention(qd, qd, qd)), 4 * h * d * b * nd * nd)
    offs = [0] + torch.cumsum(torch.tensor(seqlens), 0).tolist()

    def loop():
        for i in range(b):
            s, e = offs[i], offs[i + 1]
            if e > s:
                F.scaled_dot_product_attention(*(z[s:e].transpose(0, 1)[None] for z in (q, k, v)))

    add("attention fwd", "per-image loop SDPA", tm(loop), fl)
    try:
        nested = [torch.nested.nested_tensor_from_jagged(z, offsets=torch.tensor(
            offs, device=dev)).transpose(1, 2) for z in (q, k, v)]
        add("attention fwd", "nested-tensor SDPA",
            tm(lambda: F.scaled_dot_product_attention(*nested)), fl)
    except Exception as e:  # noqa: BLE001 - reported as unavailable
        add("attention fwd", "nested-tensor SDPA", {"ms": None}, note=f"unavailable: {e}"[:80])
    if dev.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            doc = torch.repeat_interleave(torch.arange(b, device=dev),
                                          torch.tensor(seqlens, device=dev))
            flex = torch.compile(flex_attention)

            def mask_mod(bi, hi, qi, ki):
                return doc[qi] == doc[ki]

            def run_flex():
                bm = create_block_mask(mask_mod, None, None, total, total, device=dev)
                return flex(*(z.transpose(0, 1)[None] for z in (q, k, v)), block_mask=bm)

            add("attention fwd", "FlexAttention doc mask (+mask build)", tm(run_flex), fl)
        except Exception as e:  # noqa: BLE001
            add("attention fwd", "FlexAttention", {"ms": None}, note=f"unavailable: {e}"[:80])
    # backward
    qg, kg, vg = (z.clone().requires_grad_() for z in (q, k, v))
    for be in _backends(lambda be: dk.varlen_attention(qg, kg, vg, cu, cu, m, m, backend=be)):
        o = dk.varlen_attention(qg, kg, vg, cu, cu, m, m, backend=be)
        go = torch.randn_like(o)
        add("attention bwd", f"varlen {be}",
            tm(lambda o=o, go=go: torch.autograd.grad(o, (qg, kg, vg), go, retain_graph=True)),
            2.5 * fl)
    qdg = qd.clone().requires_grad_()
    od = F.scaled_dot_product_attention(qdg, qdg, qdg)
    god = torch.randn_like(od)
    add("attention bwd", "dense SDPA (same T)",
        tm(lambda: torch.autograd.grad(od, qdg, god, retain_graph=True)),
        2.5 * 4 * h * d * b * nd * nd)

    # --- MLP on packed rows
    fc1 = torch.nn.Linear(c, 4 * c, device=dev, dtype=dtype)
    fc2 = torch.nn.Linear(4 * c, c, device=dev, dtype=dtype)
    xp = packed.contiguous()
    mlp_fl = 2 * total * c * 4 * c * 2
    add("mlp fwd", "cuBLAS/torch F.linear (packed rows)",
        tm(lambda: fc2(F.gelu(fc1(xp))) + xp), mlp_fl)

    def mlp(be):
        hid = dk.packed_linear(xp, fc1.weight, fc1.bias, t, activation="gelu", backend=be)
        return dk.packed_linear(hid, fc2.weight, fc2.bias, t, residual=xp, backend=be)

    for be in _backends(mlp):
        add("mlp fwd", f"packed_linear {be} (fused epilogues)" if be != "torch" else
            "packed_linear torch", tm(lambda be=be: mlp(be)), mlp_fl)

    # --- selection
    kcls = 150
    cl = torch.randn(b, kcls, 2, device=dev, dtype=dtype)
    ml = torch.randn(kcls, t.capacity, device=dev, dtype=dtype) * 4
    for be in _backends(lambda be: dk.dtop_select(cl, ml, t, 0.9, backend=be)):
        add("dtop_select", be, tm(lambda be=be: dk.dtop_select(cl, ml, t, 0.9, backend=be)))
    return env, rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=SHAPES, default="base",
                   help="layer shapes: base (ViT-B: C=768, 12 heads) or large (C=1024, 16 heads)")
    p.add_argument("--res", type=int, default=512, help="image size in pixels (16-px patches)")
    p.add_argument("--batch", type=int, default=8, help="images in the ragged batch")
    p.add_argument("--keep", type=float, default=0.7,
                   help="mean fraction of tokens active (images spread around it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per impl (default 3; 0 with --quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per impl (default 50 GPU, 5 CPU; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (smoke test)")
    p.add_argument("--json", nargs="?", const="", default=None,
                   help="write rows as JSON (default path: benchmarks/results/)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 3)
    args.repeats = args.repeats or (1 if args.quick else (50 if gpu else 5))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("note: TRITON_INTERPRET is set; Triton timings are interpreter timings",
              file=sys.stderr)
    # Kernels not yet verified on a GPU warn on every explicit call; the table says which ran.
    warnings.filterwarnings("ignore", message=".*not yet passed its tests on a GPU.*")
    env, rows = bench(args)
    print(header(env))
    print(format_table(rows, [("op", "op", ""), ("impl", "impl", ""), ("ms", "ms", ".3f"),
                              ("p20", "p20", ".3f"), ("p80", "p80", ".3f"),
                              ("gbs", "GB/s", ".1f"), ("pct_copy", "% copy", ".0f"),
                              ("tflops", "TFLOP/s", ".2f"), ("note", "note", "")]))
    if args.json is not None:
        path = write_json(args.json or default_json_path(env, "ops"), env, rows,
                          args=vars(args))
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
