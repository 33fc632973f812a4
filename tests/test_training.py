"""Data on disk, training and evaluation end to end, on a tiny synthetic data set (CPU, seconds).

- the generator writes exactly the ADE20K layout mmseg reads (and the folder layout);
- the loader's label mapping is checked against the PNGs read here; bad input names its file;
- train transforms keep image and labels aligned and are a function of their seed;
- a few training steps, then evaluation: the report's metrics, token counts and FLOP saving are
  recomputed here from the model's own outputs with a per-class loop;
- resuming from a checkpoint reaches the same weights and optimizer state as an uninterrupted run.

Needs Pillow (``pip install ".[test]"`` installs it); skipped without.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL", reason="the data loader needs Pillow (pip install Pillow)")
from PIL import Image

from dtop_kernels.data import (
    IGNORE_INDEX,
    DataError,
    EvalTransform,
    TrainTransform,
    open_dataset,
)
from dtop_kernels.data.synthetic import write_synthetic_dataset
from dtop_kernels.evaluate import evaluate, predict
from dtop_kernels.evaluate import main as evaluate_main
from dtop_kernels.models import count_flops
from dtop_kernels.models.checkpoint import build_model, load_model, read_checkpoint
from dtop_kernels.train import IterationBatches, load_init, lr_factor
from dtop_kernels.train import main as train_main

K = 4
SIZE = {"height": (60, 72), "width": (64, 90)}
TRAIN_ARGS = ["--arch", "tiny", "--crop", "64", "--scale", "128", "64", "--batch-size", "2",
              "--lr", "1e-3", "--warmup-iters", "2", "--threshold", "0.5", "--workers", "0",
              "--log-interval", "1", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, train=6, val=3, num_classes=K, seed=3, **SIZE)
    return root


# ---------------------------------------------------------------------- data set on disk
def test_generator_writes_the_ade20k_layout(data):
    meta = json.loads((data / "dataset.json").read_text())
    assert meta["num_classes"] == K and len(meta["classes"]) == K
    for split, n in (("training", 6), ("validation", 3)):
        imgs = sorted((data / "images" / split).iterdir())
        anns = sorted((data / "annotations" / split).iterdir())
        assert len(imgs) == len(anns) == n
        assert [p.stem for p in imgs] == [p.stem for p in anns]
        for pi, pa in zip(imgs, anns):
            with Image.open(pi) as im, Image.open(pa) as an:
                assert (im.format, im.mode) == ("JPEG", "RGB")
                assert (an.format, an.mode) == ("PNG", "L")
                assert im.size == an.size
                assert 60 <= im.size[1] <= 72 and 64 <= im.size[0] <= 90
                assert set(np.unique(np.array(an)).tolist()) <= set(range(K + 1))


def test_loader_reduces_zero_label(data):
    ds = open_dataset(data, "training")
    assert ds.num_classes == K and len(ds) == 6
    seen = set()
    for i in range(len(ds)):
        img, lab = ds.load(i)
        with Image.open(ds.samples[i].mask) as m:
            raw = np.array(m)
        want = np.where(raw == 0, IGNORE_INDEX, raw.astype(np.int64) - 1)
        assert img.shape == raw.shape + (3,) and np.array_equal(lab, want)
        seen |= set(np.unique(lab).tolist())
    assert IGNORE_INDEX in seen and len(seen - {IGNORE_INDEX}) >= 2  # borders are ignored


def test_folder_layout(tmp_path):
    write_synthetic_dataset(tmp_path, train=2, val=1, num_classes=3, layout="folder", **SIZE)
    ds = open_dataset(tmp_path, "train")
    _, lab = ds.load(0)
    with Image.open(ds.samples[0].mask) as m:
        assert np.array_equal(lab, np.array(m))  # no label shift in the folder layout
    (tmp_path / "dataset.json").unlink()
    with pytest.raises(DataError, match="needs num_classes"):
        open_dataset(tmp_path, "val")
    assert len(open_dataset(tmp_path, "val", num_classes=3)) == 1


def _copy_split(data: Path, dst: Path) -> tuple[Path, Path]:
    img_dir, ann_dir = dst / "images" / "training", dst / "annotations" / "training"
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    for p in sorted((data / "images" / "training").iterdir())[:2]:
        (img_dir / p.name).write_bytes(p.read_bytes())
        q = data / "annotations" / "training" / f"{p.stem}.png"
        (ann_dir / q.name).write_bytes(q.read_bytes())
    return img_dir, ann_dir


def test_bad_input_names_the_file(data, tmp_path):
    with pytest.raises(DataError, match="neither layout"):
        open_dataset(tmp_path, "training")
    img_dir, ann_dir = _copy_split(data, tmp_path / "d")
    masks = sorted(ann_dir.iterdir())
    # labels outside the classes
    ds = open_dataset(tmp_path / "d", "training", num_classes=K)
    with Image.open(min(img_dir.iterdir())) as im:
        size = im.size
    Image.fromarray(np.full(size[::-1], K + 3, np.uint8)).save(masks[0])
    with pytest.raises(DataError, match=f"{masks[0].name}.*found \\[{K + 3}\\]"):
        ds.load(0)
    # a mask whose size differs from its image
    Image.fromarray(np.ones((size[1] + 1, size[0]), np.uint8)).save(masks[0])
    with pytest.raises(DataError, match=f"{masks[0].name}: label size"):
        ds.load(0)
    # a colour mask
    Image.fromarray(np.ones(size[::-1] + (3,), np.uint8)).save(masks[0])
    with pytest.raises(DataError, match=r"\(mode L or P\); got mode RGB"):
        ds.load(0)
    # an image without its mask
    masks[1].unlink()
    with pytest.raises(DataError, match=f"{sorted(img_dir.iterdir())[1].name}"):
        open_dataset(tmp_path / "d", "training", num_classes=K)


# ---------------------------------------------------------------------- transforms
def test_train_transform_keeps_image_and_labels_aligned(tmp_path):
    """An image coloured by its labels stays coloured by its labels after resize, crop, flip
    and padding (no photometric change)."""
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    lab = np.zeros((50, 70), np.uint8)
    lab[:, 35:] = 1
    lab[20:30, 10:60] = 2
    tf = TrainTransform(crop=96, scale=(128, 64), photometric=False)
    for seed in range(6):
        x, y = tf(palette[lab], lab, np.random.default_rng(seed))
        assert x.shape == (3, 96, 96) and y.shape == (96, 96) and y.dtype == torch.int64
        valid = y != IGNORE_INDEX
        assert bool((x[:, ~valid] == 0).all())  # padding: image 0, labels ignored
        # away from label boundaries (where resizing blends colours) the colour is the label's
        pad = torch.nn.functional.pad(y, (1, 1, 1, 1), value=IGNORE_INDEX)
        inner = valid.clone()
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            inner &= pad[dy:dy + 96, dx:dx + 96] == y
        got = x.permute(1, 2, 0)[inner]
        want = (torch.tensor(palette, dtype=torch.float32)[y[inner]] -
                torch.tensor(tf.mean)) / torch.tensor(tf.std)
        bad = float(((got - want).abs().amax(1) > 0.05).double().mean())
        assert inner.sum() > 1000 and bad < 0.01, f"seed {seed}: misaligned at {bad:.1%}"
        x2, y2 = tf(palette[lab], lab, np.random.default_rng(seed))
        assert torch.equal(x, x2) and torch.equal(y, y2)  # a function of the seed


def test_test_transform_resizes_the_image_only(data):
    ds = open_dataset(data, "validation", transform=EvalTransform(scale=(128, 64)))
    img, lab = ds[0]
    raw, _ = open_dataset(data, "validation").load(0)
    assert lab.shape == raw.shape[:2]
    assert min(img.shape[1:]) == 64


def test_iteration_batches_and_schedule():
    full = list(IterationBatches(5, 2, 6, seed=1))
    assert list(IterationBatches(5, 2, 6, seed=1, start=4)) == full[4:]
    r0, r1 = (list(IterationBatches(5, 1, 6, seed=1, rank=r, world=2)) for r in (0, 1))
    assert [a + b for a, b in zip(r0, r1)] == full  # ranks split each global batch
    epoch0 = [i for b in full for i, _ in b][:5]
    assert sorted(epoch0) == list(range(5))
    assert lr_factor(0, 100, 10) == pytest.approx(1e-6)
    assert lr_factor(50, 100, 10) == pytest.approx(0.5 ** 0.9)


# ---------------------------------------------------------------------- train, resume, evaluate
def _states_equal(a: dict, b: dict) -> None:
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def test_train_resume_and_evaluate(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--data", str(data), "--iters", "4", "--dense-iters", "2", "--ckpt-interval", "2",
              *TRAIN_ARGS]
    train_main(["--out", str(a), *common])
    assert sorted(p.name for p in a.iterdir()) == ["final.pth", "iter_2.pth", "iter_4.pth",
                                                   "log.jsonl"]
    log = [json.loads(line) for line in (a / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2, 3, 4]
    assert [r["pruning"] for r in log] == [False, False, True, True]
    assert all(np.isfinite(r["loss"]) for r in log)
    train_main(["--out", str(b), "--resume", str(a / "iter_2.pth"), *common])
    _states_equal(read_checkpoint(a / "final.pth"), read_checkpoint(b / "final.pth"))
    assert read_checkpoint(b / "final.pth")["iteration"] == 4

    # --init with a checkpoint of the trainer starts from its weights
    model, _ = load_model(a / "final.pth")
    fresh = build_model("tiny", K)
    assert "iteration 4" in load_init(fresh, str(a / "final.pth"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k

    # evaluation: the report against metrics, counts and FLOPs recomputed here
    val = open_dataset(data, "validation", transform=EvalTransform(scale=(128, 64)))
    crop, stride = 64, 42
    rep = evaluate(model, val, thresholds=[0.5], crop=crop, stride=stride)
    assert [r["setting"] for r in rep["rows"]] == ["dense", "dtop@0.5"]
    for row, thr in zip(rep["rows"], [None, 0.5]):
        inter, union = np.zeros(K), np.zeros(K)
        macs, tokens = [], []
        for i in range(len(val)):
            img, lab = val[i]
            pr = predict(model, img, mode="dense" if thr is None else "packed", threshold=thr,
                         crop=crop, stride=stride)
            prob = torch.nn.functional.interpolate(pr.prob[None], size=lab.shape,
                                                   mode="bilinear", align_corners=False)[0]
            p, lab = prob.argmax(0).numpy(), lab.numpy()
            ok = lab != IGNORE_INDEX
            for c in range(K):
                inter[c] += ((p == c) & (lab == c) & ok).sum()
                union[c] += (((p == c) | (lab == c)) & ok).sum()
            fc = count_flops(model, pr.counts, pr.window_size, aux_heads=thr is not None)
            macs.append(float(fc.macs.sum()))
            tokens.append(pr.counts.sum(1).double())
        iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
        assert row["mIoU"] == pytest.approx(np.nanmean(iou))
        assert row["gmacs"] == pytest.approx(np.mean(macs) / 1e9)
        assert row["tokens_per_stage"] == pytest.approx(torch.stack(tokens).mean(0).tolist())
        if thr is None:
            dense = np.mean(macs)
        assert row["flop_saving"] == pytest.approx(1 - np.mean(macs) / dense)


def test_evaluate_command(data, tmp_path):
    run = tmp_path / "run"
    train_main(["--data", str(data), "--out", str(run), "--iters", "1", *TRAIN_ARGS])
    maps = importlib.util.find_spec("matplotlib") is not None
    args = ["--checkpoint", str(run / "final.pth"), "--data", str(data), "--thresholds", "0.5",
            "0.9", "--latency-images", "1", "--repeats", "2", "--json", str(tmp_path / "e.json")]
    if maps:
        args += ["--maps", str(tmp_path / "maps"), "--map-images", "1"]
    evaluate_main(args)
    out = json.loads((tmp_path / "e.json").read_text())
    assert [r["setting"] for r in out["report"]["rows"]] == ["dense", "dtop@0.5", "dtop@0.9"]
    assert out["report"]["crop"] == 64 and out["report"]["stride"] == 42  # from the checkpoint
    assert [r["setting"] for r in out["latency"]] == ["dense", "dtop@0.5", "dtop@0.9"]
    if maps:
        assert (tmp_path / "maps" / "exits_0_0.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------- evaluation: odd images
def _folder_split(root: Path, images: dict[str, Image.Image], label_size) -> Path:
    """A folder-layout "val" split of the given images, each with random labels in [0, K)."""
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, im in images.items():
        im.save(root / "val" / "images" / name)
        w, h = label_size(im)
        Image.fromarray(rng.integers(0, K, (h, w), dtype=np.uint8)).save(
            root / "val" / "masks" / f"{Path(name).stem}.png")
    return root


def test_images_of_any_mode_read_as_rgb(tmp_path):
    """Grayscale, grayscale + alpha, RGBA, palette, CMYK and 16-bit grayscale files read as the
    RGB that Pillow's own conversion gives (16-bit: the high byte), and evaluate."""
    g = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    rgb = Image.fromarray(np.dstack([g, 255 - g, g // 2]))
    images = {"gray.png": Image.fromarray(g), "gray.jpg": Image.fromarray(g),
              "gray_alpha.png": Image.fromarray(g).convert("LA"),
              "rgba.png": rgb.convert("RGBA"), "palette.png": rgb.convert("P"),
              "cmyk.jpg": rgb.convert("CMYK"),
              "gray16.png": Image.fromarray(g.astype(np.uint16) * 257)}
    ds = open_dataset(_folder_split(tmp_path, images, lambda im: im.size), "val", num_classes=K)
    model = build_model("tiny", K).eval()
    for i in range(len(ds)):
        img, _ = ds.load(i)
        with Image.open(ds.samples[i].image) as im:
            want = (np.repeat(g[..., None], 3, axis=2) if im.mode.startswith("I")
                    else np.asarray(im.convert("RGB")))
        assert img.dtype == np.uint8 and np.array_equal(img, want), ds.name(i)
    val = open_dataset(tmp_path, "val", num_classes=K, transform=EvalTransform(scale=(128, 64)))
    assert evaluate(model, val, thresholds=[0.5], crop=64, stride=42)["images"] == len(images)


def test_evaluate_images_of_any_size_and_aspect(tmp_path):
    """From 1 x 1 to 1 x 700 and 700 x 1: the test resize keeps every side at least one pixel
    within the scale, and whole-image and sliding-window evaluation score every labelled pixel
    (pixel accuracy recomputed here from predict)."""
    rng = np.random.default_rng(2)
    sizes = [(1, 1), (1, 700), (700, 1), (5, 300), (300, 5), (40, 33)]  # (H, W)
    images = {f"{h}x{w}.png": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in sizes}
    _folder_split(tmp_path, images, lambda im: im.size)
    val = open_dataset(tmp_path, "val", num_classes=K, transform=EvalTransform(scale=(128, 64)))
    model = build_model("tiny", K).eval()
    for i in range(len(val)):
        img, lab = val[i]
        h, w = img.shape[1:]
        assert 1 <= min(h, w) <= 64 and max(h, w) <= 128, (val.name(i), img.shape)
    for crop, stride in ((None, None), (64, 42)):
        row = evaluate(model, val, thresholds=[0.5], crop=crop, stride=stride)["rows"][0]
        right = total = 0
        for i in range(len(val)):
            img, lab = val[i]
            prob = predict(model, img, mode="dense", crop=crop, stride=stride).prob
            pred = torch.nn.functional.interpolate(prob[None], size=lab.shape, mode="bilinear",
                                                   align_corners=False)[0].argmax(0)
            right, total = right + int((pred == lab).sum()), total + lab.numel()
        assert row["aAcc"] == pytest.approx(right / total)
