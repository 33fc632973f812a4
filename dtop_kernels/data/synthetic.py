"""Write a small synthetic segmentation data set in the ADE20K layout (or the folder layout).

    python -m dtop_kernels.data.synthetic --out DIR [--train 200 --val 40]

Scenes of textured shapes on textured backgrounds, one texture family per class: horizontal
stripes, vertical stripes, checkerboard, dots, smooth gradient, noise (``CLASSES``; the first K
are used). Each class also has a hue family (as sky is blue and grass green; neighbouring classes'
families overlap a little); each region draws its hue, saturation, the two lightness levels of its
pattern, period and phase. Easy regions: the large background areas (one or two classes split by a
wavy boundary). Hard regions: small shapes, shapes in low contrast (texture faded towards the
background's mean colour), and a noisy band across part of the image. A 2-pixel band along every
shape's outline is unlabelled (label 0, ignored), as ADE20K leaves object borders.

ADE20K layout (mmseg): ``images/{training,validation}/NAME.jpg`` (JPEG, quality 90) and
``annotations/{training,validation}/NAME.png`` with labels 1..K (0 = ignored). Folder layout:
``{train,val}/images/NAME.jpg`` and ``{train,val}/masks/NAME.png`` with labels 0..K-1 (255 =
ignored). ``dataset.json`` records the classes. Deterministic in ``seed``.
"""

from __future__ import annotations

import argparse
import colorsys
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dtop_kernels.data.datasets import IGNORE_INDEX, _pil, require_pillow

CLASSES = ("stripes_h", "stripes_v", "checker", "dots", "smooth", "noise")


def _texture(cls: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [h, w, 3] in 0..255 of texture family ``cls``."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    hue = (cls / len(CLASSES) + rng.uniform(-0.06, 0.06)) % 1.0  # each class its hue family
    sat = rng.uniform(0.35, 0.9)
    c0 = 255 * np.array(colorsys.hsv_to_rgb(hue, sat, rng.uniform(0.2, 0.45)))
    c1 = 255 * np.array(colorsys.hsv_to_rgb(hue, sat, rng.uniform(0.7, 1.0)))
    period = rng.uniform(6, 14)
    phase = rng.uniform(0, 2 * np.pi)
    if cls == 0:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * ys / period + phase)
    elif cls == 1:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * xs / period + phase)
    elif cls == 2:
        t = ((np.floor(ys / period) + np.floor(xs / period)) % 2).astype(np.float32)
    elif cls == 3:
        cy, cx = (ys + phase) % period - period / 2, (xs + phase) % period - period / 2
        t = (cy ** 2 + cx ** 2 < (period / 3.2) ** 2).astype(np.float32)
    elif cls == 4:
        ang = rng.uniform(0, 2 * np.pi)
        t = (np.cos(ang) * ys + np.sin(ang) * xs) / max(h, w)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        c1 = c0 + rng.uniform(-30, 30, 3)  # a gentle gradient
    else:
        t = rng.uniform(0, 1, (h, w)).astype(np.float32)
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _shape_mask(h: int, w: int, rng: np.random.Generator, small: bool) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    r = rng.uniform(0.06, 0.11) if small else rng.uniform(0.15, 0.32)
    r *= min(h, w)
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    kind = rng.integers(3)
    if kind == 0:  # disc
        return (ys - cy) ** 2 + (xs - cx) ** 2 < r ** 2
    if kind == 1:  # rectangle
        return (np.abs(ys - cy) < r) & (np.abs(xs - cx) < r * rng.uniform(0.6, 1.6))
    # triangle: three half-planes around the centre
    ang = rng.uniform(0, 2 * np.pi) + np.arange(3) * 2 * np.pi / 3
    inside = np.ones((h, w), dtype=bool)
    for a in ang:
        inside &= (np.cos(a) * (xs - cx) + np.sin(a) * (ys - cy)) < r * 0.6
    return inside


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels within ``width`` of the mask's boundary (inside or outside)."""
    grown, shrunk = mask.copy(), mask.copy()
    for _ in range(width):
        g, s = grown.copy(), shrunk.copy()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            g |= np.roll(grown, (dy, dx), axis=(0, 1))
            s &= np.roll(shrunk, (dy, dx), axis=(0, 1))
        grown, shrunk = g, s
    return grown & ~shrunk


def make_scene(h: int, w: int, num_classes: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [h, w, 3], labels uint8 [h, w] in 0..K-1 or IGNORE_INDEX)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    bg = rng.choice(num_classes, size=2, replace=num_classes < 2)
    img = _texture(int(bg[0]), h, w, rng)
    lab = np.full((h, w), bg[0], dtype=np.uint8)
    if rng.random() < 0.6:  # a second background below a wavy line
        line = h * rng.uniform(0.35, 0.65) + h * 0.08 * np.sin(
            2 * np.pi * xs / (w * rng.uniform(0.5, 1.5)) + rng.uniform(0, 6))
        lower = ys > line
        img = np.where(lower[..., None], _texture(int(bg[1]), h, w, rng), img)
        lab[lower] = bg[1]
    ignore = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(2, 6))):
        cls = int(rng.integers(num_classes))
        small = rng.random() < 0.35
        m = _shape_mask(h, w, rng, small)
        if not m.any():
            continue
        tex = _texture(cls, h, w, rng)
        if rng.random() < 0.25:  # low contrast: faded towards what lies under the shape
            under = img[m].mean(axis=0)
            tex = under + rng.uniform(0.25, 0.45) * (tex - under)
        img = np.where(m[..., None], tex, img)
        lab[m] = cls
        ignore &= ~m
        ignore |= _outline(m)
    if rng.random() < 0.5:  # a noisy band: a hard region
        y0 = int(rng.uniform(0, 0.7) * h)
        band = slice(y0, y0 + int(0.25 * h))
        img[band] += rng.normal(0, rng.uniform(25, 45), img[band].shape)
    img = img + rng.normal(0, 4, img.shape)  # sensor noise everywhere
    lab[ignore] = IGNORE_INDEX
    return np.clip(img, 0, 255).astype(np.uint8), lab


def write_synthetic_dataset(
    root: str | Path, *, train: int = 200, val: int = 40, num_classes: int = len(CLASSES),
    height: Sequence[int] = (224, 288), width: Sequence[int] = (256, 352), seed: int = 0,
    layout: str = "ade20k",
) -> dict:
    """Write the data set (module docstring) under ``root``; returns its ``dataset.json``.

    Image sizes are drawn uniformly from ``height`` and ``width`` (inclusive ranges)."""
    Image = _pil("write_synthetic_dataset")
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must lie in [1, {len(CLASSES)}]; got {num_classes}")
    if layout not in ("ade20k", "folder"):
        raise ValueError(f"layout must be 'ade20k' or 'folder'; got {layout!r}")
    if min(train, val) < 1:
        raise ValueError(f"train and val must be at least 1; got {train}, {val}")
    root = Path(root)
    splits = (("training", train), ("validation", val)) if layout == "ade20k" else \
        (("train", train), ("val", val))
    rng = np.random.default_rng(seed)
    for split, count in splits:
        if layout == "ade20k":
            img_dir, ann_dir = root / "images" / split, root / "annotations" / split
        else:
            img_dir, ann_dir = root / split / "images", root / split / "masks"
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h = int(rng.integers(height[0], height[-1] + 1))
            w = int(rng.integers(width[0], width[-1] + 1))
            img, lab = make_scene(h, w, num_classes, rng)
            if layout == "ade20k":  # 1..K, 0 = ignored
                lab = np.where(lab == IGNORE_INDEX, 0, lab + 1).astype(np.uint8)
            name = f"synth_{split}_{i:05d}"
            Image.fromarray(img).save(img_dir / f"{name}.jpg", quality=90)
            Image.fromarray(lab).save(ann_dir / f"{name}.png")
    meta = {"name": "synthetic textures", "layout": layout, "num_classes": num_classes,
            "classes": list(CLASSES[:num_classes]), "seed": seed,
            "splits": {s: n for s, n in splits}}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m dtop_kernels.data.synthetic",
        description="Write a synthetic segmentation data set (textured shapes on textured "
                    "backgrounds) in the ADE20K layout mmseg reads, or the folder layout. "
                    "Needs Pillow.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="root folder (created)")
    ap.add_argument("--train", type=int, default=200, help="training images")
    ap.add_argument("--val", type=int, default=40, help="validation images")
    ap.add_argument("--classes", type=int, default=len(CLASSES),
                    help=f"number of classes (at most {len(CLASSES)})")
    ap.add_argument("--layout", choices=("ade20k", "folder"), default="ade20k",
                    help="ADE20K layout (mmseg) or the folder layout (module docstring)")
    ap.add_argument("--seed", type=int, default=0, help="the data set is a function of it")
    args = ap.parse_args(argv)
    try:
        require_pillow("python -m dtop_kernels.data.synthetic")
    except ImportError as e:
        ap.exit(2, f"error: {e}\n")
    try:
        meta = write_synthetic_dataset(args.out, train=args.train, val=args.val,
                                       num_classes=args.classes, seed=args.seed,
                                       layout=args.layout)
    except ValueError as e:
        ap.error(str(e))
    print(f"wrote {args.out}: {meta['splits']}, classes {meta['classes']}")


if __name__ == "__main__":
    main()
