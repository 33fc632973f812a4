"""Segmentation data sets on disk: the ADE20K layout as mmsegmentation reads it and a generic
image/mask-folder layout (Pillow + numpy); transforms in :mod:`dtop_kernels.data.transforms`.

Layouts (``open_dataset`` recognizes either, per split)::

    ade20k  ROOT/images/{training,validation}/NAME.jpg
            ROOT/annotations/{training,validation}/NAME.png
            label PNG values 0..K; 0 = "other" is ignored and 1..K become 0..K-1
            (mmseg's reduce_zero_label: 0 -> 255, v -> v - 1); K = 150 for ADE20K
    folder  ROOT/{SPLIT}/images/NAME.{jpg,jpeg,png}
            ROOT/{SPLIT}/masks/NAME.png
            label PNG values 0..K-1 are the classes, 255 is ignored

A ``dataset.json`` at ROOT (written by :mod:`dtop_kernels.data.synthetic`) may give
``num_classes`` and ``classes``; otherwise the ADE20K layout means 150 classes and the folder
layout needs ``num_classes``. Label PNGs are single-channel (mode L or P; P indices are the
labels). Images of any Pillow mode are read as RGB (grayscale repeated, alpha dropped, 16-bit
scaled to 8). Bad input raises :class:`DataError` naming the file (and the item's index): an
image without a mask, an unreadable image or mask, a mask whose size differs from its image's,
labels outside the classes. :class:`CheckedItems` carries such errors out of loader workers as
data, and optionally skips the items.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = 255
ADE20K_CLASSES = 150
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
