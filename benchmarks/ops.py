"""Per-op benchmarks on the ViT-DToP shapes: every backend that can run here, against baselines.

    python benchmarks/ops.py                     # GPU: ViT-B and ViT-L, batch 1 and 8; CPU: ViT-B, 8
    python benchmarks/ops.py --model large --res 640 --batch 4 --json
    python benchmarks/ops.py --auto-order        # GPU: record the measured auto order per op
    python benchmarks/ops.py --quick             # tiny shapes, few repeats (smoke test)

Every implementation of every op runs at each shape (keep 0.7: images spread over keep +- 0.2):
the package's backends, and as peers PyTorch's varlen attention, padded SDPA with a key mask,
FlexAttention with a document mask, nested-tensor SDPA, the per-image loop, dense SDPA on the
same token count, and cuBLAS (F.linear) on the gathered rows. A peer that cannot run here is a
row with its reason in the note column (e.g. GPU only on a CPU); one that raises is a row with
its error ("error" in the JSON, the note column), and the others are timed and written as usual.

--auto-order [PATH] (GPU): per op, the package backends ranked by their summed forward time over
the measured shapes (a backend that could not run every shape after those that could) become the
entry of this GPU architecture in dtop_kernels/auto_order.json (or PATH), with the device,
versions, date and commit; commit it only from a run whose GPU tests passed.

Derived figures (formulas):
- memory-bound ops: GB/s = bytes moved / time; bytes are counted per op below; "% copy" is that
  against a device-to-device copy of the same number of bytes (``dst.copy_(src)``) measured here.
- attention: FLOPs = 4 * H * D * sum_b(nq_b * nk_b) forward (two GEMMs), x 2.5 for backward;
  the dense baseline runs SDPA on a rectangular batch with the same total token count.
- linear: FLOPs = 2 * T * K * N with T the active rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Stopped,
    default_json_path,
    environment,
    format_table,
    header,
    stop_on_sigterm,
    time_fn,
    write_json,
    write_stopped_json,
)

import dtop_kernels as dk
from dtop_kernels import BACKENDS, BackendError, auto_order
from dtop_kernels.reference import attention as ref_attention
from dtop_kernels.reference import torch_varlen

SHAPES = {"base": (768, 12), "large": (1024, 16)}
NAMES = {"base": "ViT-B", "large": "ViT-L"}
# benchmark op -> the dispatched op whose auto order it ranks (forward rows only)
RANKED = {"gather_tokens": "gather_tokens", "scatter_tokens": "scatter_tokens",
          "gather+layernorm": "layer_norm", "attention fwd": "varlen_attention",
          "mlp fwd": "packed_linear", "dtop_select": "dtop_select"}


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
    """The backends that can run ``fn(backend)`` here (runs it once each); one that fails with
    another error is kept: its row records the error."""
    ok = []
    for be in BACKENDS:
        try:
            fn(be)
        except BackendError:
            continue
        except Exception:  # noqa: BLE001, S110 - recorded by the row's timing
            pass
        ok.append(be)
    return ok


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def measured_orders(rows: list[dict]) -> dict[str, list[str]]:
    """Per dispatched op: the backends with rows, fastest first by their summed median time over
    the shapes; a backend missing at some shape (it could not run there) after the others."""
    shapes = {r["shape"] for r in rows}
    total: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        op, be = RANKED.get(r["op"]), r.get("backend")
        if op and be and r.get("ms") is not None:
            total.setdefault(op, {}).setdefault(be, []).append(r["ms"])
    return {op: sorted(times, key=lambda be: (len(times[be]) < len(shapes), sum(times[be])))
            for op, times in total.items()}


def write_auto_order(path: Path, env: dict, rows: list[dict], source: str) -> Path:
    """Put this GPU architecture's measured orders into the table at ``path``."""
    table = auto_order.load(path) if path.exists() else {"format": auto_order.FORMAT,
                                                          "gpus": {}}
    arch = auto_order.arch(torch.device("cuda"))
    table["gpus"][arch] = auto_order.make_entry(env, measured_orders(rows), source)
    auto_order.check(table, str(path))
    path.write_text(json.dumps(table, indent=2) + "\n")
    return path


def bench(args, partial: dict | None = None) -> tuple[dict, list[dict]]:
    """Measure; ``partial`` (a dict), when given, holds ``env`` and ``rows`` as they grow, for a
    run stopped before the end (:class:`Stopped`)."""
    partial = {} if partial is None else partial
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    env = environment(dtype, dev)
    rows: list[dict] = []
    partial.update(env=env, rows=rows)
    for model in args.model:
        for b in args.batch:
            try:
                bench_shape(args, dev, dtype, model, b, rows)
            except Exception as e:  # noqa: BLE001 - a row says what failed; the others stand
                rows.append({"shape": f"{NAMES[model]} B={b}", "op": "setup", "impl": "-",
                             "ms": None, "error": _error(e), "note": _error(e)})
    return env, rows


def bench_shape(args, dev: torch.device, dtype: torch.dtype, model: str, b: int,
                rows: list[dict] | None = None) -> list[dict]:
    """The rows of one shape, appended to ``rows`` (a new list by default) as they are
    measured."""
    c, h = SHAPES[model]
    n = (args.res // 16) ** 2 if args.res else (512 // 16 if model == "base" else 640 // 16) ** 2
    shape = f"{NAMES[model]} B={b}"
    if args.quick:
        c, h, n, b = 64, 2, 64, 2
        shape = f"tiny B={b}"
    d = c // h
    t = _tokens(b, n, args.keep, dev)
    total = int(t.cu_seqlens[-1])  # benchmark setup: one host read is fine here
    seqlens = t.seqlens.tolist()
    rows = [] if rows is None else rows

    def tm(fn) -> dict:
        """The timing of ``fn``, or its error (the row records it; the others go on)."""
        try:
            return time_fn(fn, dev, warmup=args.warmup, repeats=args.repeats)
        except Exception as e:  # noqa: BLE001
            return {"ms": None, "error": _error(e)}
    esize = torch.empty((), dtype=dtype).element_size()

    def add(op, impl, timing, flops=None, nbytes=None, copy_gbs=None, note=None, backend=None):
        row = {"shape": shape, "op": op, "impl": impl, "T": total, "B": b, "N": n, "C": c,
               **timing}
        if backend is not None:
            row["backend"] = backend
        if timing.get("ms") is None:
            flops = nbytes = None
        if flops is not None:
            row["tflops"] = flops / timing["ms"] / 1e9
        if nbytes is not None:
            row["gbs"] = nbytes / timing["ms"] / 1e6
            if copy_gbs:
                row["pct_copy"] = 100 * row["gbs"] / copy_gbs
        note = note or timing.get("error")
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
            nbytes=moved, copy_gbs=copy_gbs, backend=be)
    packed = dk.gather_tokens(x, t, backend="torch")
    out = x.clone()
    for be in _backends(lambda be: dk.scatter_tokens(packed, t, out, backend=be)):
        add("scatter_tokens", be,
            tm(lambda be=be: dk.scatter_tokens(packed, t, out, backend=be)),
            nbytes=moved, copy_gbs=copy_gbs, backend=be)
    ln = torch.nn.LayerNorm(c, eps=1e-6, device=dev, dtype=dtype)
    flat = x.reshape(-1, c)
    idx = t.indices.long()
    add("gather+layernorm", "torch index_select+layer_norm",
        tm(lambda: ln(flat.index_select(0, idx))), nbytes=moved, copy_gbs=copy_gbs,
        backend="torch")
    if dev.type == "cuda":
        from dtop_kernels.ops.layernorm import layer_norm_tokens

        kernels = [be for be, ok in (("triton", dk.triton_import_error() is None),
                                     ("cuda", dk.cuda_build_info()["import_error"] is None))
                   if ok]
        for be in kernels:
            add("gather+layernorm", f"{be} fused",
                tm(lambda be=be: layer_norm_tokens(flat, ln.weight, ln.bias, t, 1e-6,
                                                   gather=True, backend=be)),
                nbytes=moved, copy_gbs=copy_gbs, backend=be)

    # --- attention
    q = torch.randn(total, h, d, device=dev, dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    fl = 4 * h * d * sum(s * s for s in seqlens)
    cu, m = t.cu_seqlens, t.max_seqlen
    for be in _backends(lambda be: dk.varlen_attention(q, k, v, cu, cu, m, m, backend=be)):
        add("attention fwd", f"varlen {be}",
            tm(lambda be=be: dk.varlen_attention(q, k, v, cu, cu, m, m, backend=be)), fl,
            backend=be)
    scale = d ** -0.5
    why = torch_varlen.reasons(q, k, v)
    add("attention fwd", "PyTorch varlen_attn (flash)",
        {"ms": None} if why else tm(lambda: torch_varlen.attention(q, k, v, cu, cu, m, m, scale)),
        fl, note="; ".join(why) or None)
    add("attention fwd", "padded SDPA, key mask (no sync)",
        tm(lambda: ref_attention.attention_padded(q, k, v, cu, cu, m, m, scale)), fl)
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
    else:
        add("attention fwd", "FlexAttention doc mask (+mask build)", {"ms": None},
            note="GPU only (compiled FlexAttention)")
    # backward
    qg, kg, vg = (z.clone().requires_grad_() for z in (q, k, v))
    for be in _backends(lambda be: dk.varlen_attention(qg, kg, vg, cu, cu, m, m, backend=be)):
        try:
            o = dk.varlen_attention(qg, kg, vg, cu, cu, m, m, backend=be)
        except Exception as e:  # noqa: BLE001
            add("attention bwd", f"varlen {be}", {"ms": None, "error": _error(e)})
            continue
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
    add("mlp fwd", "F.linear on the gathered rows (cuBLAS on GPU)",
        tm(lambda: fc2(F.gelu(fc1(xp))) + xp), mlp_fl)

    def mlp(be):
        hid = dk.packed_linear(xp, fc1.weight, fc1.bias, t, activation="gelu", backend=be)
        return dk.packed_linear(hid, fc2.weight, fc2.bias, t, residual=xp, backend=be)

    for be in _backends(mlp):
        add("mlp fwd", f"packed_linear {be} (fused epilogues)" if be != "torch" else
            "packed_linear torch", tm(lambda be=be: mlp(be)), mlp_fl, backend=be)

    # --- selection
    kcls = 150
    cl = torch.randn(b, kcls, 2, device=dev, dtype=dtype)
    ml = torch.randn(kcls, t.capacity, device=dev, dtype=dtype) * 4
    for be in _backends(lambda be: dk.dtop_select(cl, ml, t, 0.9, backend=be)):
        add("dtop_select", be, tm(lambda be=be: dk.dtop_select(cl, ml, t, 0.9, backend=be)),
            backend=be)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=SHAPES, nargs="+", default=None,
                   help="layer shapes: base (ViT-B: C=768, 12 heads, 512 px) and/or large "
                        "(C=1024, 16 heads, 640 px); default both on GPU, base on CPU")
    p.add_argument("--res", type=int, default=None,
                   help="image size in pixels (16-px patches; default 512 base, 640 large)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="images in the ragged batch (default 1 and 8 on GPU, 8 on CPU)")
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
    p.add_argument("--auto-order", nargs="?", const=str(auto_order.TABLE), default=None,
                   help="GPU: write this architecture's measured auto order per op into the "
                        "table (default dtop_kernels/auto_order.json)")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if args.auto_order and not gpu:
        p.error("--auto-order records a GPU architecture's order: run it on a CUDA device")
    args.model = args.model or (["base", "large"] if gpu else ["base"])
    args.batch = args.batch or ([1, 8] if gpu else [8])
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 3)
    args.repeats = args.repeats or (1 if args.quick else (50 if gpu else 5))
    if dk.triton_interpreted():
        print("note: TRITON_INTERPRET is set; Triton timings are interpreter timings",
              file=sys.stderr)
    # Kernels not yet verified on a GPU warn on every explicit call; the table says which ran.
    warnings.filterwarnings("ignore", message=".*not yet passed its tests on a GPU.*")
    stop_on_sigterm()
    partial: dict = {}
    try:
        env, rows = bench(args, partial)
    except Stopped as e:
        write_stopped_json(args.json, "ops", partial, e, args=vars(args))
        sys.exit(f"ops.py: {e}")
    print(header(env))
    print(format_table(rows, [("shape", "shape", ""), ("op", "op", ""), ("impl", "impl", ""),
                              ("ms", "ms", ".3f"),
                              ("p20", "p20", ".3f"), ("p80", "p80", ".3f"),
                              ("gbs", "GB/s", ".1f"), ("pct_copy", "% copy", ".0f"),
                              ("tflops", "TFLOP/s", ".2f"), ("note", "note", "")]))
    if args.json is not None:
        path = write_json(args.json or default_json_path(env, "ops"), env, rows,
                          args=vars(args), complete=True)
        print(f"wrote {path}", file=sys.stderr)
    orders = measured_orders(rows)
    print("measured order per op (fastest first, summed over the shapes): " + "; ".join(
        f"{op}: {' > '.join(o)}" for op, o in orders.items()))
    if args.auto_order:
        path = write_auto_order(Path(args.auto_order), env, rows, source=" ".join(sys.argv))
        print(f"wrote the auto order of this GPU into {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
