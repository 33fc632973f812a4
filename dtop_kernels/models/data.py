"""Segmentation data on disk: the ADE20K layout as mmsegmentation reads it, a generic
image/mask-folder layout, and mmsegmentation's train and test transforms (Pillow + numpy).

Layouts (``open_dataset`` recognizes either, per split)::

    ade20k  ROOT/images/{training,validation}/NAME.jpg
            ROOT/annotations/{training,validation}/NAME.png
            label PNG values 0..K; 0 = "other" is ignored and 1..K become 0..K-1
            (mmseg's reduce_zero_label: 0 -> 255, v -> v - 1); K = 150 for ADE20K
    folder  ROOT/{SPLIT}/images/NAME.{jpg,jpeg,png}
            ROOT/{SPLIT}/masks/NAME.png
            label PNG values 0..K-1 are the classes, 255 is ignored

A ``dataset.json`` at ROOT (written by :mod:`dtop_kernels.models.synthetic_dataset`) may give
``num_classes`` and ``classes``; otherwise the ADE20K layout means 150 classes and the folder
layout needs ``num_classes``. Label PNGs are single-channel (mode L or P; P indices are the
labels). Images of any Pillow mode are read as RGB (grayscale repeated, alpha dropped, 16-bit
scaled to 8). Bad input raises :class:`DataError` naming the file (and the item's index): an
image without a mask, an unreadable image or mask, a mask whose size differs from its image's,
labels outside the classes. :class:`CheckedItems` carries such errors out of loader workers as
data, and optionally skips the items.

Transforms (mmseg's ADE20K pipeline, sizes as arguments):

- train: resize keeping the aspect ratio to ``scale`` (2048, 512) times a ratio drawn from
  [0.5, 2.0] (image bilinear, labels nearest); random crop ``crop`` x ``crop`` re-drawn up to 10
  times while one class covers more than ``cat_max_ratio`` = 0.75 of the crop's labelled pixels;
  horizontal flip with probability 0.5; photometric distortion (brightness +-32, contrast and
  saturation x[0.5, 1.5], hue +-18 on OpenCV's 180-step scale, each with probability 0.5, contrast
  before or after the colour changes at random); normalize; pad to the crop (image 0, labels 255).
- test: resize keeping the aspect ratio to ``scale`` (short side 512 unless the long side would
  pass 2048); normalize. The labels stay at their original size (metrics are computed there).

Every random draw comes from a ``numpy.random.Generator`` passed in, so a sample is a function of
its seed (reproducible across workers, processes and resumed runs).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = 255
ADE20K_CLASSES = 150
MEAN = (123.675, 116.28, 103.53)  # mmseg's ImageNet mean / std on 0..255 RGB
STD = (58.395, 57.12, 57.375)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PILLOW_HINT = 'pip install Pillow (or pip install "dtop-kernels[data]")'


class DataError(ValueError):
    """A data set on disk does not have the expected layout or content."""


def require_pillow(what: str = "reading images") -> None:
    """Raise ImportError naming ``what`` and the install command unless Pillow imports."""
    _pil(what)


def _pil(what: str = "reading images"):
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{what} needs Pillow, which is not installed: {PILLOW_HINT}") from e
    return Image


# ---------------------------------------------------------------------- files
@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path


class SegmentationFolder(torch.utils.data.Dataset):
    """Image / label-PNG pairs from two folders, matched by file stem.

    ``reduce_zero_label``: label 0 is ignored and v becomes v - 1 (ADE20K). Items are
    ``transform(image uint8 [H, W, 3], labels uint8 [H, W], rng)`` when an index is an int
    (rng seeded by the index) or an ``(index, seed)`` pair; without a transform,
    ``(image, labels)`` as numpy arrays. ``name(i)`` is the stem of item i.
    """

    def __init__(self, img_dir: str | Path, ann_dir: str | Path, num_classes: int, *,
                 reduce_zero_label: bool = False, transform=None,
                 ignore_index: int = IGNORE_INDEX) -> None:
        require_pillow("SegmentationFolder")
        self.img_dir, self.ann_dir = Path(img_dir), Path(ann_dir)
        for what, d in (("image folder", self.img_dir), ("label folder", self.ann_dir)):
            if not d.is_dir():
                raise DataError(f"{what} {d} does not exist")
        if not isinstance(num_classes, int) or not 1 <= num_classes <= 254:
            raise DataError(f"num_classes must be an int in [1, 254] (labels are uint8 and "
                            f"{IGNORE_INDEX} is ignored); got {num_classes!r}")
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform
        self.ignore_index = ignore_index
        images = sorted(p for p in self.img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.img_dir}")
        masks = {p.stem: p for p in self.ann_dir.iterdir() if p.suffix.lower() == ".png"}
        missing = [p.name for p in images if p.stem not in masks]
        if missing:
            raise DataError(f"{len(missing)} image(s) in {self.img_dir} have no label PNG of the "
                            f"same name in {self.ann_dir}, e.g. {missing[0]} (expected "
                            f"{Path(missing[0]).stem}.png)")
        self.samples = [Sample(p, masks[p.stem]) for p in images]

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, i: int) -> str:
        return self.samples[i].image.stem

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 [H, W, 3] RGB, labels uint8 [H, W] in [0, K) or ignore_index).

        Any image mode becomes RGB: grayscale is repeated, an alpha channel dropped (as mmcv's
        colour read does), 16-bit grayscale scaled to 8 bits. DataError ``item i: FILE: what is
        wrong`` for an unreadable file, a colour label PNG, a size mismatch or labels outside
        the classes."""
        s = self.samples[i]
        with _open_image(s.image, i) as im:
            if im.mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale
                img = np.repeat(np.clip(np.asarray(im, np.int64) >> 8, 0, 255)
                                .astype(np.uint8)[..., None], 3, axis=2)
            else:
                img = np.asarray(im.convert("RGB"))
        with _open_image(s.mask, i) as m:
            if m.mode not in ("L", "P"):
                raise DataError(f"item {i}: {s.mask}: label PNGs must be single-channel label "
                                f"indices (mode L or P); got mode {m.mode} (colour masks must be "
                                "converted to class indices)")
            lab = np.array(m)
        if lab.shape != img.shape[:2]:
            raise DataError(f"item {i}: {s.mask}: label size {lab.shape[1]} x {lab.shape[0]} "
                            f"(W x H) differs from its image {s.image.name}: {img.shape[1]} x "
                            f"{img.shape[0]}")
        return img, self._labels(lab, f"item {i}: {s.mask}")

    def _labels(self, lab: np.ndarray, where: str) -> np.ndarray:
        k, ign = self.num_classes, self.ignore_index
        top = k if self.reduce_zero_label else k - 1  # largest valid raw value
        bad = (lab > top) & (lab != ign)
        if bad.any():
            rule = (f"0..{k} (0 = ignored, v -> v - 1)" if self.reduce_zero_label
                    else f"0..{k - 1}") + f" or {ign} (ignored)"
            raise DataError(f"{where}: labels must be {rule} for {k} classes; found "
                            f"{np.unique(lab[bad])[:8].tolist()} (set num_classes, or fix the "
                            "mask)")
        if self.reduce_zero_label:
            lab = np.where(lab == 0, ign, lab.astype(np.int16) - 1)
            lab = np.where(lab == ign - 1, ign, lab).astype(np.uint8)
        return lab

    def __getitem__(self, index):
        i, seed = index if isinstance(index, tuple) else (index, index)
        img, lab = self.load(i)
        if self.transform is None:
            return img, lab
        return self.transform(img, lab, np.random.default_rng(seed))


@contextmanager
def _open_image(path: Path, i: int):
    """The decoded Pillow image of ``path`` (item ``i``); DataError naming both when it cannot
    be read (missing, truncated, not an image)."""
    Image = _pil()
    try:
        im = Image.open(path)
        im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"item {i}: {path}: cannot read it as an image ({e})") from None
    with im:
        yield im


@dataclass(frozen=True)
class CheckedItem:
    """What :class:`CheckedItems` yields: the item (None when it could not be read) and the
    errors of the unreadable items it stands for."""

    item: tuple | None
    errors: tuple[str, ...] = ()


class CheckedItems(torch.utils.data.Dataset):
    """``dataset``'s items as :class:`CheckedItem`, so a :class:`DataError` reaches the main
    process as data (its message, not a loader worker's traceback).

    ``skip``: an unreadable item is replaced by the next readable one (index + 1, + 2, ...;
    with the same augmentation seed), so batches keep their size and distributed ranks stay in
    step; the errors of the skipped items travel along to be counted. Indices are ints or
    ``(index, seed)`` pairs, as :class:`SegmentationFolder` takes them."""

    def __init__(self, dataset, skip: bool = False) -> None:
        self.dataset, self.skip = dataset, skip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index) -> CheckedItem:
        i, seed = index if isinstance(index, tuple) else (index, None)
        errors = []
        for j in range(i, i + len(self.dataset)):
            j %= len(self.dataset)
            try:
                item = self.dataset[j if seed is None else (j, seed)]
                return CheckedItem(item, tuple(errors))
            except DataError as e:
                errors.append(str(e))
                if not self.skip:
                    break
        return CheckedItem(None, tuple(errors))


def collate_checked(batch: list[CheckedItem]) -> tuple[tuple | None, list[str]]:
    """(the default collation of the items, or None when one could not be read; the errors)."""
    errors = [e for b in batch for e in b.errors]
    if any(b.item is None for b in batch):
        return None, errors
    return torch.utils.data.default_collate([b.item for b in batch]), errors


# ---------------------------------------------------------------------- layouts
def read_meta(root: str | Path) -> dict:
    """``ROOT/dataset.json`` as a dict ({} when absent)."""
    p = Path(root) / "dataset.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e})") from e


def detect_layout(root: str | Path, split: str) -> str:
    """"ade20k" or "folder" (module docstring); DataError naming what is missing otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    if (root / "images" / split).is_dir() and (root / "annotations" / split).is_dir():
        return "ade20k"
    if (root / split / "images").is_dir() and (root / split / "masks").is_dir():
        return "folder"
    found = sorted(p.name + "/" for p in root.iterdir() if p.is_dir())[:10]
    raise DataError(f"{root} has neither layout for split {split!r}: expected "
                    f"images/{split}/ + annotations/{split}/ (ADE20K, mmseg) or "
                    f"{split}/images/ + {split}/masks/ (folder); found {found or 'no folders'}")


def open_dataset(root: str | Path, split: str, *, num_classes: int | None = None,
                 transform=None, layout: str = "auto") -> SegmentationFolder:
    """The ``split`` of the data set at ``root`` (layout "auto" | "ade20k" | "folder")."""
    layout = detect_layout(root, split) if layout == "auto" else layout
    meta = read_meta(root)
    root = Path(root)
    if num_classes is None:
        num_classes = meta.get("num_classes")
    if layout == "ade20k":
        return SegmentationFolder(root / "images" / split, root / "annotations" / split,
                                  num_classes or ADE20K_CLASSES, reduce_zero_label=True,
                                  transform=transform)
    if layout == "folder":
        if num_classes is None:
            raise DataError(f"{root}: the folder layout needs num_classes (or a dataset.json "
                            "with it)")
        return SegmentationFolder(root / split / "images", root / split / "masks", num_classes,
                                  transform=transform)
    raise ValueError(f"layout must be 'auto', 'ade20k' or 'folder'; got {layout!r}")


def default_split(root: str | Path, *, train: bool) -> str:
    """The training or validation split's folder name of the layout found at ``root``:
    training / validation (ADE20K) or train / val (folder)."""
    ade = (Path(root) / "images").is_dir()
    return ("training" if train else "validation") if ade else ("train" if train else "val")


# ---------------------------------------------------------------------- transforms
def rescale_size(w: int, h: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest (W, H) with the long side <= max(scale) and the
    short side <= min(scale); at least 1 pixel each (a very thin image stays an image)."""
    long_, short = max(scale), min(scale)
    f = min(long_ / max(w, h), short / min(w, h))
    return max(int(w * f + 0.5), 1), max(int(h * f + 0.5), 1)  # a side of 1 pixel, not 0


def _resize(img: np.ndarray, lab: np.ndarray | None, size: tuple[int, int]):
    Image = _pil()
    img = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
    if lab is not None:
        lab = np.asarray(Image.fromarray(lab).resize(size, Image.NEAREST))
    return img, lab


def _crop_box(lab: np.ndarray, crop: int, rng: np.random.Generator, cat_max_ratio: float,
              ignore_index: int) -> tuple[int, int]:
    h, w = lab.shape
    for _ in range(10):
        y = int(rng.integers(0, max(h - crop, 0) + 1))
        x = int(rng.integers(0, max(w - crop, 0) + 1))
        if cat_max_ratio >= 1:
            break
        vals, cnt = np.unique(lab[y:y + crop, x:x + crop], return_counts=True)
        cnt = cnt[vals != ignore_index]
        if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
            break
    return y, x


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on uint8 RGB [H, W, 3] (module docstring)."""
    Image = _pil()

    def clip(x: np.ndarray) -> np.ndarray:
        return np.clip(x, 0, 255)

    out = img.astype(np.float32)
    if rng.integers(2):
        out = clip(out + rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        out = clip(out * rng.uniform(0.5, 1.5))
    sat, hue = bool(rng.integers(2)), bool(rng.integers(2))
    s_mul = rng.uniform(0.5, 1.5) if sat else 1.0
    h_add = int(rng.integers(-18, 18)) if hue else 0
    if sat or hue:
        hsv = np.asarray(Image.fromarray(out.astype(np.uint8)).convert("HSV")).astype(np.float32)
        hsv[..., 1] = clip(hsv[..., 1] * s_mul)
        hsv[..., 0] = (hsv[..., 0] + h_add * 256 / 180) % 256  # Pillow's hue has 256 steps
        out = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"),
                         dtype=np.float32)
    if not contrast_first and rng.integers(2):
        out = clip(out * rng.uniform(0.5, 1.5))
    return out.astype(np.uint8)


def normalize(img: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD
              ) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W], (x - mean) / std per channel."""
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def denormalize(x: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD
                ) -> torch.Tensor:
    """Inverse of :func:`normalize`: [.., 3, H, W] -> values in [0, 255] (float)."""
    m = torch.tensor(mean, device=x.device)[:, None, None]
    s = torch.tensor(std, device=x.device)[:, None, None]
    return (x.float() * s + m).clamp(0, 255)


@dataclass
class TrainTransform:
    """mmseg's train pipeline (module docstring). Returns (img float32 [3, crop, crop],
    labels int64 [crop, crop])."""

    crop: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: Sequence[float] = MEAN
    std: Sequence[float] = STD
    ignore_index: int = IGNORE_INDEX

    def __call__(self, img: np.ndarray, lab: np.ndarray, rng: np.random.Generator):
        r = rng.uniform(*self.ratio_range)
        size = rescale_size(img.shape[1], img.shape[0], [int(s * r) for s in self.scale])
        img, lab = _resize(img, lab, size)
        y, x = _crop_box(lab, self.crop, rng, self.cat_max_ratio, self.ignore_index)
        img, lab = img[y:y + self.crop, x:x + self.crop], lab[y:y + self.crop, x:x + self.crop]
        if rng.random() < self.flip_prob:
            img, lab = img[:, ::-1], lab[:, ::-1]
        if self.photometric:
            img = photometric_distortion(img, rng)
        x_t = normalize(img, self.mean, self.std)
        lab_t = torch.from_numpy(np.array(lab, dtype=np.int64))
        ph, pw = self.crop - lab_t.shape[0], self.crop - lab_t.shape[1]
        if ph or pw:
            x_t = torch.nn.functional.pad(x_t, (0, pw, 0, ph), value=0.0)
            lab_t = torch.nn.functional.pad(lab_t, (0, pw, 0, ph), value=self.ignore_index)
        return x_t, lab_t


@dataclass
class EvalTransform:
    """mmseg's test pipeline: keep-ratio resize to ``scale``, normalize. Returns (img float32
    [3, h, w] resized, labels int64 [H, W] at the original size)."""

    scale: tuple[int, int] = (2048, 512)
    mean: Sequence[float] = MEAN
    std: Sequence[float] = STD

    def __call__(self, img: np.ndarray, lab: np.ndarray, rng: np.random.Generator | None = None):
        size = rescale_size(img.shape[1], img.shape[0], self.scale)
        small, _ = _resize(img, None, size)
        return normalize(small, self.mean, self.std), torch.from_numpy(lab.copy()).long()
