"""Segmentation metrics, sliding-window inference and evaluation of odd labels
(dtop_kernels.evaluate).

The metrics are checked against a confusion matrix and IoUs computed by hand, and against a
per-image, per-class loop written after mmseg's ``intersect_and_union``; sliding-window inference
against windows run one by one and averaged here.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from dtop_kernels.evaluate import (
    confusion_matrix,
    evaluate,
    format_report,
    metrics,
    predict,
    windows,
)
from dtop_kernels.models import vit_dtop_tiny

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


# ---------------------------------------------------------------------- evaluation: odd labels
def _tiny_eval_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return vit_dtop_tiny(num_classes=4, threshold=0.5).eval()


def _own_predictions(model, items) -> list[torch.Tensor]:
    """Each item's class map at its label's size, from predict (the evaluation's definition)."""
    out = []
    for img, lab in items:
        prob = predict(model, img, mode="dense").prob
        out.append(torch.nn.functional.interpolate(prob[None], size=lab.shape, mode="bilinear",
                                                   align_corners=False)[0].argmax(0))
    return out


def test_labels_all_ignored(gen):
    """An image whose labels are all ignored adds nothing to the metrics; a split of only such
    images reports NaN metrics (nothing to measure) instead of failing."""
    model = _tiny_eval_model()
    labelled = (torch.randn(3, 32, 48, generator=gen), torch.randint(0, 4, (32, 48), generator=gen))
    ignored = (torch.randn(3, 40, 24, generator=gen), torch.full((40, 24), IGN))
    alone = evaluate(model, [labelled], thresholds=[0.5])
    both = evaluate(model, [labelled, ignored], thresholds=[0.5])
    for a, b in zip(alone["rows"], both["rows"]):
        for key in ("mIoU", "mAcc", "aAcc"):
            assert b[key] == pytest.approx(a[key]), (a["setting"], key)
        torch.testing.assert_close(torch.tensor(b["IoU"]), torch.tensor(a["IoU"]), equal_nan=True)
    none = evaluate(model, [ignored, ignored], thresholds=[0.5])
    for row in none["rows"]:
        assert all(math.isnan(row[k]) for k in ("mIoU", "mAcc", "aAcc"))
        assert all(math.isnan(v) for v in row["IoU"])
    assert "nan" in format_report(none)


def test_class_absent_from_the_split_is_nan_and_left_out(gen):
    """Classes 2 and 3 are in no label: IoU NaN where the model never predicts them either
    (0 where it does), mIoU the mean of the others (mmseg's nanmean); the report says so."""
    model = _tiny_eval_model()
    items = [(torch.randn(3, 32, 32, generator=gen), torch.randint(0, 2, (32, 32), generator=gen))
             for _ in range(2)]
    preds = _own_predictions(model, items)
    predicted = set(torch.cat([p.flatten() for p in preds]).tolist())
    assert not {2, 3} <= predicted, "pick a seed where an absent class is never predicted"
    row = evaluate(model, items, thresholds=[0.5])["rows"][0]
    iou = []
    for c in range(4):
        inter = sum(int(((p == c) & (lab == c)).sum()) for p, (_, lab) in zip(preds, items))
        union = sum(int(((p == c) | (lab == c)).sum()) for p, (_, lab) in zip(preds, items))
        iou.append(inter / union if union else math.nan)
    torch.testing.assert_close(torch.tensor(row["IoU"], dtype=torch.float64),
                               torch.tensor(iou, dtype=torch.float64), equal_nan=True)
    assert row["mIoU"] == pytest.approx(sum(v for v in iou if not math.isnan(v))
                                        / sum(not math.isnan(v) for v in iou))
    text = format_report(evaluate(model, items, thresholds=[0.5]))
    assert re.search(r" [23]=nan", text) and "nan: a class neither labelled nor predicted" in text
