"""Segmentation metrics and sliding-window inference (dtop_kernels.models.evaluate).

The metrics are checked against a confusion matrix and IoUs computed by hand, and against a
per-image, per-class loop written after mmseg's ``intersect_and_union``; sliding-window inference
against windows run one by one and averaged here.
"""

from __future__ import annotations

import math

import pytest
import torch

from dtop_kernels.models import vit_dtop_tiny
from dtop_kernels.models.evaluate import confusion_matrix, metrics, predict, windows

IGN = 255


def test_confusion_matrix_and_metrics_by_hand():
    # 3 classes; class 2 is never labelled but predicted once; one pixel ignored.
    label = torch.tensor([[0, 0, 1, 1],
                          [0, 1, 1, IGN]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 1, 2, 0]])
    # label 0: predicted 0, 1, 0 -> row [2, 1, 0]; label 1: 1, 1, 1, 2 -> row [0, 3, 1]
    want = torch.tensor([[2, 1, 0], [0, 3, 1], [0, 0, 0]])
    conf = confusion_matrix(pred, label, 3)
    assert torch.equal(conf, want)
    m = metrics(conf)
    # IoU0 = 2 / (3 + 2 - 2) = 2/3; IoU1 = 3 / (4 + 4 - 3) = 3/5; IoU2 = 0 / (0 + 1 - 0) = 0
    assert m["IoU"] == pytest.approx([2 / 3, 3 / 5, 0.0])
    assert m["mIoU"] == pytest.approx((2 / 3 + 3 / 5 + 0) / 3)
    # Acc0 = 2/3, Acc1 = 3/4, Acc2 undefined (no label) -> NaN, left out of mAcc
    assert m["Acc"][:2] == pytest.approx([2 / 3, 3 / 4]) and math.isnan(m["Acc"][2])
    assert m["mAcc"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert m["aAcc"] == pytest.approx(5 / 7)


def test_class_absent_everywhere_is_nan_and_left_out():
    conf = confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), 4)
    m = metrics(conf)
    assert math.isnan(m["IoU"][2]) and math.isnan(m["IoU"][3])
    assert m["mIoU"] == pytest.approx((1 / 2 + 1 / 2) / 2)


def _mmseg_style(preds, labels, k):
    """Per image: areas of intersection, prediction, label for each class (boolean masks, one
    class at a time), summed over images; then mmseg's total_area_to_metrics."""
    inter = torch.zeros(k, dtype=torch.float64)
    area_p, area_l = torch.zeros_like(inter), torch.zeros_like(inter)
    for p, lab in zip(preds, labels):
        valid = lab != IGN
        for c in range(k):
            inter[c] += float(((p == c) & (lab == c) & valid).sum())
            area_p[c] += float(((p == c) & valid).sum())
            area_l[c] += float(((lab == c) & valid).sum())
    union = area_p + area_l - inter
    iou = inter / union
    return iou, float(iou.nanmean()), float(inter.sum() / area_l.sum())


def test_metrics_match_a_per_class_loop(gen):
    k = 5
    preds = [torch.randint(0, k, (7, 9), generator=gen) for _ in range(4)]
    labels = []
    for p in preds:
        lab = torch.where(torch.rand(p.shape, generator=gen) < 0.6, p,
                          torch.randint(0, k - 1, p.shape, generator=gen))  # class 4: rarely
        labels.append(torch.where(torch.rand(p.shape, generator=gen) < 0.1, IGN, lab))
    conf = sum(confusion_matrix(p, lab, k) for p, lab in zip(preds, labels))
    m = metrics(conf)
    iou, miou, aacc = _mmseg_style(preds, labels, k)
    torch.testing.assert_close(torch.tensor(m["IoU"], dtype=torch.float64), iou,
                               equal_nan=True)
    assert m["mIoU"] == pytest.approx(miou) and m["aAcc"] == pytest.approx(aacc)


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 2)
    with pytest.raises(ValueError, match="labels must lie"):
        confusion_matrix(torch.zeros(4), torch.tensor([0, 1, 7, IGN]), 3)


@pytest.mark.parametrize("h,w", [(512, 683), (512, 512), (300, 700), (1000, 520)])
def test_slide_windows_follow_mmseg(h, w):
    boxes = windows(h, w, 512, 341)
    cover = torch.zeros(h, w, dtype=torch.int64)
    for y1, y2, x1, x2 in boxes:
        assert y2 - y1 == min(512, h) and x2 - x1 == min(512, w)
        assert 0 <= y1 and y2 <= h and 0 <= x1 and x2 <= w
        cover[y1:y2, x1:x2] += 1
    assert bool((cover > 0).all())
    rows = max(h - 512 + 340, 0) // 341 + 1
    cols = max(w - 512 + 340, 0) // 341 + 1
    assert len(boxes) == rows * cols
    assert windows(h, w, None, None) == [(0, h, 0, w)]


def test_slide_prediction_averages_its_windows():
    torch.manual_seed(0)
    model = vit_dtop_tiny(num_classes=4, threshold=1.0).double().eval()
    img = torch.randn(3, 64, 88, dtype=torch.float64)
    crop, stride = 48, 32
    got = predict(model, img, mode="dense", crop=crop, stride=stride)
    total = torch.zeros(4, 64, 88, dtype=torch.float64)
    hits = torch.zeros(64, 88, dtype=torch.float64)
    for y1, y2, x1, x2 in windows(64, 88, crop, stride):
        with torch.no_grad():
            p = model(img[None, :, y1:y2, x1:x2], mode="dense", aux_heads=False).pred[0]
        total[:, y1:y2, x1:x2] += p
        hits[y1:y2, x1:x2] += 1
    torch.testing.assert_close(got.prob.double(), total / hits, atol=1e-6, rtol=0)
    assert got.counts.shape == (3, len(windows(64, 88, crop, stride)))
    # whole-image inference pads to the patch size and cuts the padding off again
    whole = predict(model, img[:, :60, :85], mode="dense")
    assert whole.prob.shape == (4, 60, 85) and whole.window_size == (64, 96)
