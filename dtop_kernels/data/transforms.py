"""mmsegmentation's train and test transforms for segmentation (Pillow + numpy, no torchvision):
its ADE20K pipeline, sizes as arguments.

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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dtop_kernels.data.datasets import IGNORE_INDEX, _pil

MEAN = (123.675, 116.28, 103.53)  # mmseg's ImageNet mean / std on 0..255 RGB
STD = (58.395, 57.12, 57.375)


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
