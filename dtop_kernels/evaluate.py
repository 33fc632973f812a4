"""Segmentation metrics (mmseg's definitions) and the DToP evaluation of one set of weights.

    python -m dtop_kernels.evaluate --checkpoint CKPT --data DIR [--json OUT] [--maps DIR]

Metrics, from the confusion matrix ``conf[label, pred]`` summed over the data set, pixels whose
label is ``ignore_index`` left out (mmseg's ``intersect_and_union`` summed over images, then
``total_area_to_metrics``):

- ``IoU[c] = conf[c, c] / (sum_p conf[c, p] + sum_l conf[l, c] - conf[c, c])``, NaN when the
  union is empty (class neither in the labels nor predicted);
- ``Acc[c] = conf[c, c] / sum_p conf[c, p]``, NaN when class c has no labelled pixel;
- ``mIoU``, ``mAcc``: means over classes ignoring NaN; ``aAcc = trace(conf) / conf.sum()``.

Inference (mmseg's ``whole`` and ``slide`` modes): the test-resized image, or windows of
``crop`` x ``crop`` at ``stride`` (the official DToP: 512 and 341) whose class probabilities are
summed and divided by the number of windows covering each pixel; each window is padded at the
bottom and right to a multiple of the patch size (value 0, cut off after). Probabilities are
resized bilinearly to the label's original size and the class is their argmax.

Report (:func:`evaluate`), for the same weights: "dense" (``mode="dense", aux_heads=False``:
the SegViT baseline) and DToP (``mode="packed"``) at each threshold: mIoU, mAcc, aAcc, per-class
IoU; the tokens each stage ran on per image (summed over its windows) and the share that exited
at each auxiliary head; GFLOPs per image from :func:`count_flops` at those counts (auxiliary
heads counted for DToP, not for dense: 1 multiply-add = 1 FLOP) and the FLOP saving against
dense; and the pixel accuracy of the pixels whose token exited at each head (where exits land
and whether the model was right there). :func:`measure_latency` times the forwards.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dtop_kernels.data import (
    IGNORE_INDEX,
    DataError,
    EvalTransform,
    denormalize,
    open_dataset,
)
from dtop_kernels.models.flops import count_flops


# ---------------------------------------------------------------------- metrics
def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """int64 [K, K], ``conf[l, p]`` = pixels labelled l and predicted p (ignored labels left
    out). pred, label: integer tensors of one shape; labels other than ``ignore_index`` must lie
    in [0, K), predictions in [0, K)."""
    if pred.shape != label.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and label {tuple(label.shape)} must have "
                         "the same shape (resize the prediction to the label)")
    label, pred = label.reshape(-1).long(), pred.reshape(-1).long()
    keep = label != ignore_index
    label, pred = label[keep], pred[keep]
    k = num_classes
    if label.numel() and (int(label.min()) < 0 or int(label.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k}) or be ignore_index={ignore_index}")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= k):
        raise ValueError(f"predictions must lie in [0, {k})")
    return torch.bincount(label * k + pred, minlength=k * k).reshape(k, k).cpu()


def metrics(conf: torch.Tensor) -> dict:
    """mIoU, mAcc, aAcc (fractions) and per-class IoU / Acc (NaN where undefined) of a
    confusion matrix (module docstring)."""
    conf = conf.double()
    inter = conf.diag()
    area_label, area_pred = conf.sum(1), conf.sum(0)
    union = area_label + area_pred - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.nan)
    acc = torch.where(area_label > 0, inter / area_label.clamp(min=1), torch.nan)
    total = float(conf.sum())
    return {"mIoU": float(iou.nanmean()), "mAcc": float(acc.nanmean()),
            "aAcc": float(inter.sum()) / total if total else math.nan,
            "IoU": iou.tolist(), "Acc": acc.tolist()}


# ---------------------------------------------------------------------- inference
def windows(h: int, w: int, crop: int | None, stride: int | None) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of mmseg's slide windows (one whole-image window when crop is None)."""
    if crop is None:
        return [(0, h, 0, w)]
    stride = stride or crop
    out = []
    for i in range(max(h - crop + stride - 1, 0) // stride + 1):
        for j in range(max(w - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


@dataclass
class Prediction:
    """One image's inference."""

    prob: torch.Tensor  # [K, h, w] class probabilities at the input's size
    counts: torch.Tensor  # int64 [S, n_windows]: tokens each stage ran on
    window_size: tuple[int, int]  # padded window (multiple of the patch size)
    exit_stage: torch.Tensor  # int64 [h, w]: head at which the pixel's token exited (min over
    #                           windows covering it; S - 1 = never exited)


@torch.no_grad()
def predict(model, img: torch.Tensor, *, mode: str = "packed", threshold: float | None = None,
            crop: int | None = None, stride: int | None = None, backend: str = "auto"
            ) -> Prediction:
    """Inference on one normalized image [3, h, w] (module docstring). ``mode="dense"`` runs
    the final head only (the SegViT baseline)."""
    p = model.patch_size
    h, w = img.shape[-2:]
    boxes = windows(h, w, crop, stride)
    wh, ww = boxes[0][1] - boxes[0][0], boxes[0][3] - boxes[0][2]
    ph, pw = -wh % p, -ww % p
    weight = model.patch_embed.proj.weight
    batch = torch.stack([img[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    batch = F.pad(batch, (0, pw, 0, ph)).to(weight.device, weight.dtype)
    dense = mode == "dense"
    out = model(batch, mode=mode, threshold=threshold, backend=backend, aux_heads=not dense)
    k = out.pred.shape[1]
    prob = torch.zeros(k, h, w, device=batch.device)
    cover = torch.zeros(1, h, w, device=batch.device)
    last = model.num_stages - 1
    exit_px = torch.full((h, w), last, dtype=torch.long, device=batch.device)
    ex = out.exit_stage.repeat_interleave(p, 1).repeat_interleave(p, 2)  # [n, Hp, Wp]
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        prob[:, y1:y2, x1:x2] += out.pred[i, :, :wh, :ww].float()
        cover[:, y1:y2, x1:x2] += 1
        exit_px[y1:y2, x1:x2] = torch.minimum(exit_px[y1:y2, x1:x2], ex[i, :wh, :ww])
    return Prediction(prob / cover, out.active_counts.cpu(), (wh + ph, ww + pw), exit_px.cpu())


# ---------------------------------------------------------------------- evaluation
def setting_names(thresholds: Sequence[float]) -> list[str]:
    return ["dense"] + [f"dtop@{t:g}" for t in thresholds]


@torch.no_grad()
def evaluate(model, dataset, *, thresholds: Sequence[float] = (0.8, 0.9, 0.95),
             crop: int | None = None, stride: int | None = None, backend: str = "auto",
             max_images: int | None = None, keep_maps: int = 0, skip_bad: bool = False,
             progress: Callable[[str], None] | None = None) -> dict:
    """The report of the module docstring on ``dataset`` (items (img [3, h, w], label [H, W]),
    e.g. ``open_dataset(..., transform=EvalTransform())``). ``keep_maps``: also return the first
    images with their DToP exit maps at each threshold (for pruning maps). ``skip_bad``: an
    item that raises :class:`DataError` is left out (its message in ``report["skipped"]``)
    instead of stopping the evaluation."""
    was_training = model.training
    model.eval()
    k, s_num = model.num_classes, model.num_stages
    names = setting_names(thresholds)
    conf = {n: torch.zeros(k, k, dtype=torch.int64) for n in names}
    counts = {n: [] for n in names}  # per image [S] (summed over windows)
    macs = {n: [] for n in names}
    dense_macs: list[float] = []
    exit_hits = {n: torch.zeros(s_num, 2, dtype=torch.float64) for n in names}  # [correct, all]
    maps: list[dict] = []
    skipped: list[str] = []
    n_img = len(dataset) if max_images is None else min(max_images, len(dataset))
    for i in range(n_img):
        try:
            img, label = dataset[i]
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            if progress is not None:
                progress(f"skipped {e} ({len(skipped)} skipped so far)")
            continue
        done = i - len(skipped)  # images evaluated before this one
        for name, thr in zip(names, [None, *thresholds]):
            mode = "dense" if thr is None else "packed"
            pr = predict(model, img, mode=mode, threshold=thr, crop=crop, stride=stride,
                         backend=backend)
            prob = F.interpolate(pr.prob[None], size=label.shape, mode="bilinear",
                                 align_corners=False)[0]
            pred = prob.argmax(0).cpu()
            conf[name] += confusion_matrix(pred, label, k)
            counts[name].append(pr.counts.sum(1).tolist())
            fc = count_flops(model, pr.counts, pr.window_size, aux_heads=thr is not None)
            macs[name].append(float(fc.macs.sum()))
            if thr is None:
                dense_macs.append(float(fc.dense_macs) * pr.counts.shape[1])
            ex = F.interpolate(pr.exit_stage[None, None].float(), size=label.shape,
                               mode="nearest")[0, 0].long()
            valid = label != IGNORE_INDEX
            right = (pred == label) & valid
            for s in range(s_num):
                at = (ex == s) & valid
                exit_hits[name][s] += torch.tensor([float(right[at].sum()), float(at.sum())])
            if done < keep_maps:
                if len(maps) <= done:
                    maps.append({"image": img, "label": label, "exit_stage": {},
                                 "pred": {}, "window_size": pr.window_size})
                maps[done]["exit_stage"][name] = pr.exit_stage
                maps[done]["pred"][name] = pred
        if progress is not None:
            progress(f"evaluated {i + 1}/{n_img} images")
    if was_training:
        model.train()
    if not dense_macs:
        raise DataError(f"no image of the {n_img} could be read: {skipped[0]}")
    rows = []
    dense_mean = statistics.fmean(dense_macs)
    for name, thr in zip(names, [None, *thresholds]):
        c = torch.tensor(counts[name], dtype=torch.float64)  # [images, S]
        mean = c.mean(0)
        m = metrics(conf[name])
        exited = [float((mean[s] - mean[s + 1]) / mean[0]) for s in range(s_num - 1)]
        hits = exit_hits[name]
        rows.append({
            "setting": name, "threshold": thr, **{x: m[x] for x in ("mIoU", "mAcc", "aAcc")},
            "IoU": m["IoU"], "tokens_per_stage": mean.tolist(),
            "exited_share_per_head": exited,
            "gmacs": statistics.fmean(macs[name]) / 1e9,
            "flop_saving": 1 - statistics.fmean(macs[name]) / dense_mean,
            "pixel_share_per_exit_head": (hits[:, 1] / hits[:, 1].sum()).tolist(),
            "pixel_acc_per_exit_head": [float(a / n) if n else None for a, n in hits.tolist()],
            "tokens_per_image": counts[name],
        })
    return {"images": len(dense_macs), "skipped": skipped, "num_classes": k, "crop": crop,
            "stride": stride, "dense_gmacs": dense_mean / 1e9, "rows": rows, "maps": maps}


# ---------------------------------------------------------------------- latency
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_latency(model, images: Sequence[torch.Tensor], thresholds: Sequence[float], *,
                    crop: int | None = None, stride: int | None = None, backend: str = "auto",
                    warmup: int = 1, repeats: int = 10) -> list[dict]:
    """Per-image inference latency (:func:`predict`) of dense and DToP at each threshold.

    Every setting runs once per round, in turn (round-robin, so load changes on a shared machine
    hit them alike), over ``images`` in rotation; ``warmup`` rounds first. Wall clock
    (``time.perf_counter``, the device synchronized before and after). Returns per setting the
    median, p20 and p80 in ms."""
    model.eval()
    names = setting_names(thresholds)
    dev = model.patch_embed.proj.weight.device
    samples = {n: [] for n in names}
    for r in range(warmup + repeats):
        img = images[r % len(images)]
        for name, thr in zip(names, [None, *thresholds]):
            _sync(dev)
            t0 = time.perf_counter()
            predict(model, img, mode="dense" if thr is None else "packed", threshold=thr,
                    crop=crop, stride=stride, backend=backend)
            _sync(dev)
            if r >= warmup:
                samples[name].append(1e3 * (time.perf_counter() - t0))
    out = []
    for name, thr in zip(names, [None, *thresholds]):
        q = statistics.quantiles(samples[name], n=10, method="inclusive") if repeats > 1 \
            else samples[name] * 9
        out.append({"setting": name, "threshold": thr, "ms": statistics.median(samples[name]),
                    "p20": q[1], "p80": q[7]})
    return out


# ---------------------------------------------------------------------- report
def format_report(report: dict, latency: list[dict] | None = None,
                  class_names: Sequence[str] | None = None) -> str:
    """The report as a text table (one row per setting) plus per-class IoU."""
    lat = {r["setting"]: r for r in latency or []}
    head = (f"{'setting':<11} {'mIoU':>6} {'mAcc':>6} {'aAcc':>6} {'GMACs':>8} {'FLOP save':>9} "
            f"{'tokens/stage':>18} {'exited/head':>13} {'acc@exit':>13}"
            + (f" {'ms':>8} {'p20-p80':>15}" if lat else ""))
    lines = [head]
    for r in report["rows"]:
        tok = "/".join(f"{c:.0f}" for c in r["tokens_per_stage"])
        exited = "/".join(f"{100 * e:.0f}%" for e in r["exited_share_per_head"])
        acc = "/".join("-" if a is None else f"{100 * a:.0f}"
                       for a in r["pixel_acc_per_exit_head"][:-1])
        line = (f"{r['setting']:<11} {100 * r['mIoU']:6.2f} {100 * r['mAcc']:6.2f} "
                f"{100 * r['aAcc']:6.2f} {r['gmacs']:8.4f} {100 * r['flop_saving']:8.1f}% "
                f"{tok:>18} {exited:>13} {acc or '-':>13}")
        if lat:
            t = lat[r["setting"]]
            line += f" {t['ms']:8.2f} {t['p20']:7.2f}-{t['p80']:<7.2f}"
        lines.append(line)
    names = class_names or [str(c) for c in range(report["num_classes"])]
    lines.append("per-class IoU (%): " + "; ".join(
        f"{r['setting']}: " + " ".join(f"{n}={100 * v:.1f}" for n, v in zip(names, r["IoU"]))
        for r in report["rows"][:1])
        + ("  (nan: a class neither labelled nor predicted in the split; left out of mIoU)"
           if any(math.isnan(v) for v in report["rows"][0]["IoU"]) else ""))
    lines.append(
        "columns: mIoU/mAcc/aAcc in % (mmseg's definitions) | GMACs per image (count_flops at "
        "the real token counts, 1 multiply-add = 1 FLOP; dense without aux heads) | FLOP save: "
        "1 - GMACs / GMACs_dense | tokens/stage: mean per image over its windows | exited/head: "
        "share of the tokens that exited at each auxiliary head | acc@exit: pixel accuracy (%) "
        "of the pixels whose token exited at each auxiliary head"
        + (" | ms: median per-image latency, p20-p80 its spread" if lat else ""))
    return "\n".join(lines)


def _readable_images(dataset, n: int) -> list[torch.Tensor]:
    """The images of the first ``n`` items of ``dataset`` that read without a DataError."""
    out = []
    for i in range(len(dataset)):
        if len(out) == n:
            break
        try:
            out.append(dataset[i][0])
        except DataError:
            continue
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from dtop_kernels.data import DataError, default_split, read_meta, require_pillow
    from dtop_kernels.models.checkpoint import load_model

    ap = argparse.ArgumentParser(
        prog="python -m dtop_kernels.evaluate",
        description="mIoU of dense vs DToP at several thresholds, token counts, FLOP saving "
                    "and latency for one checkpoint on a data set (ADE20K or folder layout).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint written by the trainer")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="load a checkpoint that holds pickled Python objects (runs code from "
                         "the file: only for files from a trusted source)")
    ap.add_argument("--data", required=True, help="data set root (ADE20K or folder layout)")
    ap.add_argument("--split", default=None, help="default: validation (ADE20K) / val")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.9, 0.95],
                    help="DToP exit thresholds p0, one report row each (after the dense row)")
    ap.add_argument("--scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                    help="test resize (default: the checkpoint's training scale, else 2048 512)")
    ap.add_argument("--mode", choices=("slide", "whole"), default="slide",
                    help="sliding windows (the official protocol) or the whole image")
    ap.add_argument("--crop", type=int, default=None,
                    help="slide window (default: the training crop, else 512)")
    ap.add_argument("--stride", type=int, default=None,
                    help="slide stride (default: 2/3 of the crop rounded down, 341 for 512)")
    ap.add_argument("--max-images", type=int, default=None,
                    help="evaluate only the first N images (default: all)")
    ap.add_argument("--skip-bad-samples", action="store_true",
                    help="leave out unreadable or invalid images and labels (reported and "
                         "counted) instead of stopping")
    ap.add_argument("--backend", default="auto",
                    help="kernel backend of the packed ops: auto, torch, triton or cuda")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's)")
    ap.add_argument("--latency-images", type=int, default=4,
                    help="images timed for latency (0: no latency)")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds per setting")
    ap.add_argument("--json", default=None, help="write the report (and latency) as JSON")
    ap.add_argument("--maps", default=None, metavar="DIR",
                    help="write pruning maps of the first validation images (needs matplotlib)")
    ap.add_argument("--map-images", type=int, default=4,
                    help="number of validation images drawn with --maps")
    ap.add_argument("--map-threshold", type=float, default=None,
                    help="threshold whose exits the maps show (default: the model's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        require_pillow("python -m dtop_kernels.evaluate")
    except ImportError as e:
        ap.exit(2, f"error: {e}\n")
    if args.maps:
        from dtop_kernels.models.visualize import require_matplotlib

        try:
            require_matplotlib("--maps")
        except ImportError as e:
            ap.exit(2, f"error: {e}\n")
    try:
        model, ckpt = load_model(args.checkpoint, args.device,
                                 trust_checkpoint=args.trust_checkpoint)
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    train_args = ckpt.get("args", {})
    scale = tuple(args.scale or train_args.get("scale") or (2048, 512))
    crop = None if args.mode == "whole" else (args.crop or train_args.get("crop") or 512)
    stride = None if crop is None else (args.stride or crop * 2 // 3)
    map_thr = args.map_threshold if args.map_threshold is not None else model.threshold
    thresholds = list(dict.fromkeys([*args.thresholds, map_thr] if args.maps
                                    else args.thresholds))
    try:
        split = args.split or default_split(args.data, train=False)
        ds = open_dataset(args.data, split, num_classes=model.num_classes,
                          transform=EvalTransform(scale=scale))
    except DataError as e:
        ap.error(str(e))

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    n_maps = args.map_images if args.maps else 0
    try:
        report = evaluate(model, ds, thresholds=thresholds, crop=crop, stride=stride,
                          backend=args.backend, max_images=args.max_images, keep_maps=n_maps,
                          skip_bad=args.skip_bad_samples, progress=say)
    except DataError as e:
        sys.exit(f"error: {e}" + ("" if args.skip_bad_samples else
                                  " (--skip-bad-samples evaluates the other images)"))
    latency = None
    if args.latency_images:
        imgs = _readable_images(ds, args.latency_images)
        latency = measure_latency(model, imgs, thresholds, crop=crop, stride=stride,
                                  backend=args.backend, repeats=args.repeats)
    classes = read_meta(args.data).get("classes")
    print(f"checkpoint {args.checkpoint} (iteration {ckpt.get('iteration')}), {args.data} "
          f"{split}: {report['images']} images"
          + (f" ({len(report['skipped'])} skipped)" if report["skipped"] else "")
          + f", {args.mode} inference"
          + (f" (crop {crop}, stride {stride})" if crop else "") + f", test scale {scale}, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} thread"
          + ("s" if torch.get_num_threads() != 1 else ""))
    print(format_report(report, latency, classes))
    maps = report.pop("maps")
    if args.maps:
        from dtop_kernels.models.visualize import save_pruning_maps

        name = setting_names([map_thr])[1]
        for j, m in enumerate(maps):
            img = denormalize(m["image"]) / 255
            for pth in save_pruning_maps(img, m["exit_stage"][name],
                                         Path(args.maps) / f"exits_{j}",
                                         stage_ends=model.stage_ends):
                say(f"wrote {pth}")
    if args.json:
        out = {"checkpoint": str(args.checkpoint), "iteration": ckpt.get("iteration"),
               "data": str(args.data), "split": split, "scale": scale, "mode": args.mode,
               "device": args.device, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "classes": classes,
               "report": report, "latency": latency}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        say(f"wrote {args.json}")


if __name__ == "__main__":
    main()
