"""Faults in training and evaluation, tried as a user meets them (CPU, tiny model, seconds each).

- untrusted files: a checkpoint carrying a pickled callable is refused and the callable never
  runs; every kind of file the package documents loads weights-only;
- damaged files: truncated, foreign and mismatched checkpoints get an error naming the file and
  what is wrong; ``--resume auto`` passes over a damaged newest checkpoint;
- bad data: the file and item index are named in the main process, with or without loader
  workers; ``--skip-bad-samples`` trains and evaluates past them, counting them;
- crashes: runs killed (SIGKILL) mid-iteration or mid-write, or stopped by a full disk, resume to
  exactly the weights of an uninterrupted run; a distributed rank that dies or hangs ends the
  others with an error within a bounded time.

The reference for every resumed run is an uninterrupted run of the same command.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL", reason="the data loader needs Pillow (pip install Pillow)")
from PIL import Image

import dtop_kernels
from dtop_kernels.data import open_dataset
from dtop_kernels.data.synthetic import write_synthetic_dataset
from dtop_kernels.evaluate import main as evaluate_main
from dtop_kernels.models import checkpoint
from dtop_kernels.models.checkpoint import (
    CheckpointError,
    DamagedCheckpointError,
    build_model,
    load_file,
    load_model,
    read_checkpoint,
)
from dtop_kernels.models.loading import mmseg_key_to_model
from dtop_kernels.train import IterationBatches, load_init
from dtop_kernels.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
K, ITERS, BATCH, SEED = 4, 6, 2, 0
RUN_ARGS = ["--arch", "tiny", "--crop", "64", "--scale", "128", "64", "--batch-size", str(BATCH),
            "--lr", "1e-3", "--warmup-iters", "2", "--threshold", "0.5", "--workers", "0",
            "--log-interval", "1", "--quiet", "--threads", "1", "--iters", str(ITERS),
            "--dense-iters", "2", "--ckpt-interval", "2", "--seed", str(SEED)]


def _train(*argv: str) -> None:
    """train's command line in this process (its --threads restored afterwards)."""
    threads = torch.get_num_threads()
    try:
        train_main(list(argv))
    finally:
        torch.set_num_threads(threads)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    where = str(Path(dtop_kernels.__file__).resolve().parents[1])  # this checkout's package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (where, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, train=6, val=3, num_classes=K, seed=3, height=(60, 72),
                            width=(64, 90))
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted run: iter_2, iter_4, iter_6 and final.pth."""
    run = tmp_path_factory.mktemp("reference")
    _train("--data", str(data), "--out", str(run), *RUN_ARGS)
    return run


def _same_training_state(a: Path, b: Path) -> None:
    ca, cb = read_checkpoint(a), read_checkpoint(b)
    assert ca["iteration"] == cb["iteration"]
    assert ca["model"].keys() == cb["model"].keys()
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k, v in sa[i].items():
            assert torch.equal(v, sb[i][k]), (i, k)
    assert all(torch.equal(x, y) for x, y in zip(ca["rng"]["torch"], cb["rng"]["torch"]))


def _copy_data(data: Path, dst: Path) -> Path:
    shutil.copytree(data, dst)
    return dst


def _first_item() -> int:
    """The data set item the trainer reads first (the sampler is a function of the seed)."""
    return next(iter(IterationBatches(6, BATCH, ITERS, seed=SEED)))[0][0]


# ---------------------------------------------------------------------- untrusted files
class _Payload:
    """Unpickling it calls ``open(marker, "w")``: the marker file exists iff code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickled_callable_is_refused_and_never_runs(data, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pth"
    model = build_model("tiny", K)
    torch.save({"model": model.state_dict(), "config": {"arch": "tiny", "num_classes": K,
                                                         "overrides": {}},
                "iteration": 1, "extra": _Payload(marker)}, evil)
    refused = r"evil\.pth: refused: .*pickled Python objects \(io\.open\).*--trust-checkpoint"
    for load in (lambda: read_checkpoint(evil), lambda: load_model(evil),
                 lambda: load_init(build_model("tiny", K), str(evil))):
        with pytest.raises(CheckpointError, match=refused):
            load()
        assert not marker.exists()
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(evil), "--data", str(data)])
    with pytest.raises(SystemExit, match=refused):
        _train("--data", str(data), "--out", str(tmp_path / "run"), "--init", str(evil),
               *RUN_ARGS)
    assert re.search(refused, capsys.readouterr().err)
    assert not marker.exists()
    # the opt-in loads it, payload and all: the refusal above is what kept it from running
    load_file(evil, trust_checkpoint=True)
    assert marker.exists()


_TO_MMSEG = [(r"patch_embed\.proj\.", "patch_embed.projection."),
             (r"blocks\.(\d+)\.norm1\.", r"layers.\1.ln1."),
             (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"layers.\1.attn.attn.in_proj_\2"),
             (r"blocks\.(\d+)\.attn\.proj\.", r"layers.\1.attn.attn.out_proj."),
             (r"blocks\.(\d+)\.norm2\.", r"layers.\1.ln2."),
             (r"blocks\.(\d+)\.mlp\.fc1\.", r"layers.\1.ffn.layers.0.0."),
             (r"blocks\.(\d+)\.mlp\.fc2\.", r"layers.\1.ffn.layers.1.")]


def _mmseg_name(key: str, num_stages: int) -> str:
    """The mmseg checkpoint name of a model key (checked against the loader's mapping)."""
    if key.startswith("heads."):
        _, s, rest = key.split(".", 2)
        name = (f"decode_head.{rest}" if int(s) == num_stages - 1
                else f"auxiliary_head.{s}.{rest}")
    else:
        name = key
        for pattern, repl in _TO_MMSEG:
            name = re.sub(pattern, repl, name)
        name = "backbone." + name
    assert mmseg_key_to_model(name, num_stages) == key
    return name


def test_every_documented_file_kind_loads_weights_only(reference, tmp_path):
    """The trainer's checkpoints (args, optimizer, RNG state), an official (mmcv-style)
    checkpoint with numpy values in its meta, timm weights and a plain state dict."""
    ckpt = reference / "iter_2.pth"
    torch.load(ckpt, weights_only=True)  # torch's own weights-only reader takes it as is
    state = read_checkpoint(ckpt)
    assert {"optimizer", "rng", "args"} <= state.keys() and state["args"]["crop"] == 64
    load_model(ckpt)

    src = build_model("tiny", K)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    want = src.state_dict()
    official = {
        "meta": {"mmcv_version": "1.7.1", "time": "Fri Jun  2 10:00:00 2023", "seed": 0,
                 "env_info": "sys.platform: linux", "config": "model = dict(type='DToP')",
                 "CLASSES": ("wall", "floor"), "PALETTE": [[120, 120, 120], [4, 200, 3]],
                 "iter": 160000, "hook_msgs": {"best_score": np.float64(0.47),
                                               "best_ckpt": "best_mIoU.pth"}},
        "state_dict": OrderedDict((_mmseg_name(k, src.num_stages), v) for k, v in want.items()),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
    }
    timm = {**{k: v for k, v in want.items() if not k.startswith("heads.")},
            "cls_token": torch.zeros(1, 1, 192), "norm.weight": torch.ones(192),
            "head.weight": torch.zeros(10, 192)}
    for name, obj, kind, keys in (("official.pth", official, "mmseg", want),
                                  ("timm.pth", timm, "timm", timm.keys() & want.keys()),
                                  ("plain.pth", want, "this model", want)):
        torch.save(obj, tmp_path / name)
        model = build_model("tiny", K)
        assert kind in load_init(model, str(tmp_path / name))
        got = model.state_dict()
        for k in keys:
            torch.testing.assert_close(got[k], want[k], msg=f"{name}: {k}")


# ---------------------------------------------------------------------- damaged files
def test_damaged_and_foreign_checkpoints_are_named(reference, tmp_path, capsys):
    good = (reference / "iter_2.pth").read_bytes()
    for name, content in (("half.pth", good[:len(good) // 2]), ("head.pth", good[:10]),
                          ("empty.pth", b""), ("text.pth", b"not a checkpoint\n"),
                          ("noise.pth", bytes(np.random.default_rng(0).integers(0, 256, 999,
                                                                                np.uint8)))):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DamagedCheckpointError, match=re.escape(str(path)) + ": damaged") as e:
            read_checkpoint(path)
        assert "miniz" not in str(e.value)
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", str(tmp_path / "half.pth"), "--data", "unused"])
    assert f"{tmp_path / 'half.pth'}: damaged" in capsys.readouterr().err

    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="foreign.pth is not a dtop_kernels training"):
        read_checkpoint(tmp_path / "foreign.pth")

    # weights of another configuration: the mismatching keys are named
    state = read_checkpoint(reference / "iter_2.pth")
    state["config"]["num_classes"] = K + 1
    torch.save(state, tmp_path / "edited.pth")
    other = build_model("tiny", K + 1).state_dict()
    differ = [k for k, v in state["model"].items() if v.shape != other[k].shape]
    assert differ
    with pytest.raises(CheckpointError, match=rf"edited.pth: .*do not fit.*{differ[0]}"):
        load_model(tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match=rf"iter_2.pth: .*do not fit.*{differ[0]}"):
        load_init(build_model("tiny", K + 1), str(reference / "iter_2.pth"))


def test_resume_auto_passes_over_a_damaged_checkpoint(data, reference, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for n in (2, 4):
        shutil.copy(reference / f"iter_{n}.pth", run)
    newest = run / "iter_4.pth"
    newest.write_bytes(newest.read_bytes()[:1000])
    _train("--data", str(data), "--out", str(run), "--resume", "auto", *RUN_ARGS)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "--resume auto" in ln]
    assert len(lines) == 1
    assert f"resuming from {run / 'iter_2.pth'}" in lines[0] and str(newest) in lines[0]
    _same_training_state(run / "final.pth", reference / "final.pth")

    (run / "iter_2.pth").write_bytes(b"")
    for n in (4, 6):
        (run / f"iter_{n}.pth").unlink()
    with pytest.raises(SystemExit, match="no intact checkpoint in .*iter_2.pth: damaged"):
        _train("--data", str(data), "--out", str(run), "--resume", "auto", *RUN_ARGS)


# ---------------------------------------------------------------------- bad data
def _damage(root: Path, item: int, kind: str) -> Path:
    """Spoil one training item; returns the file that is now wrong."""
    ds = open_dataset(root, "training")
    img, mask = ds.samples[item].image, ds.samples[item].mask
    if kind == "truncated image":
        img.write_bytes(img.read_bytes()[:60])
        return img
    with Image.open(mask) as m:
        w, h = m.size
    if kind == "labels outside the classes":
        Image.fromarray(np.full((h, w), K + 5, np.uint8)).save(mask)
    else:  # size mismatch
        Image.fromarray(np.ones((h + 3, w), np.uint8)).save(mask)
    return mask


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["truncated image", "labels outside the classes",
                                  "size mismatch"])
def test_bad_data_is_named_in_the_main_process(data, tmp_path, kind, workers):
    root = _copy_data(data, tmp_path / "data")
    item = _first_item()
    bad = _damage(root, item, kind)
    with pytest.raises(SystemExit) as e:
        _train("--data", str(root), "--out", str(tmp_path / "run"), *RUN_ARGS, "--workers",
               str(workers))
    msg = str(e.value.code)
    assert msg.startswith(f"error: item {item}: {bad}: "), msg
    assert "Traceback" not in msg and len(msg.splitlines()) == 1, msg
    assert "--skip-bad-samples" in msg


def test_skip_bad_samples_trains_and_evaluates_past_them(data, reference, tmp_path, capsys):
    root = _copy_data(data, tmp_path / "data")
    item = _first_item()
    _damage(root, item, "truncated image")
    run = tmp_path / "run"
    _train("--data", str(root), "--out", str(run), "--skip-bad-samples", *RUN_ARGS)
    out = capsys.readouterr().out
    # the item is drawn once per epoch of 6 items: 12 draws in 6 iterations of 2
    assert out.count(f"skipped item {item}: ") == 2
    log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_samples"] == 2 and (run / "final.pth").is_file()

    val = open_dataset(root, "validation")
    bad_val = val.samples[1].image
    bad_val.write_bytes(b"")
    cmd = ["--checkpoint", str(reference / "final.pth"), "--data", str(root), "--thresholds",
           "0.5", "--latency-images", "0", "--json", str(tmp_path / "e.json")]
    with pytest.raises(SystemExit, match=f"error: item 1: {re.escape(str(bad_val))}: cannot read"):
        evaluate_main(cmd)
    evaluate_main([*cmd, "--skip-bad-samples"])
    report = json.loads((tmp_path / "e.json").read_text())["report"]
    assert report["images"] == len(val) - 1 and len(report["skipped"]) == 1


# ---------------------------------------------------------------------- crashes
@pytest.mark.parametrize("fault,damage", [
    pytest.param("step:5", False, id="killed-mid-iteration"),
    pytest.param("save:2", False, id="killed-while-writing-a-checkpoint"),
    pytest.param("step:5", True, id="killed-and-the-newest-checkpoint-lost"),
])
def test_killed_run_resumes_to_the_uninterrupted_weights(data, reference, tmp_path, fault,
                                                         damage):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train_with_faults.py"),
                           "--fault", fault, "--data", str(data), "--out", str(run), *RUN_ARGS],
                          check=False, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if fault.startswith("save"):  # died halfway through writing iter_4: only its temporary
        assert (run / "iter_4.pth.tmp").is_file() and not (run / "iter_4.pth").exists()
    else:
        assert (run / "iter_4.pth").is_file()
    if damage:  # e.g. a power cut: the file's data never reached the disk
        (run / "iter_4.pth").write_bytes(b"")
    _train("--data", str(data), "--out", str(run), "--resume", "auto", *RUN_ARGS)
    _same_training_state(run / "final.pth", reference / "final.pth")
    log = [json.loads(ln)["iteration"] for ln in (run / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, ITERS + 1))  # each iteration logged once


class _FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.f.write(bytes(data)[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def test_disk_full_keeps_the_previous_checkpoint(data, reference, tmp_path, monkeypatch):
    real_open = open

    def open_on_full_disk(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return _FullDisk(f, 4096) if str(path).endswith("iter_4.pth.tmp") else f

    monkeypatch.setattr(checkpoint, "open", open_on_full_disk, raising=False)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        _train("--data", str(data), "--out", str(run), *RUN_ARGS)
    msg = str(e.value.code)
    assert re.fullmatch(rf"error: could not write checkpoint {re.escape(str(run))}/iter_4.pth: "
                        r"No space left on device\. .*are intact", msg), msg
    assert sorted(p.name for p in run.iterdir()) == ["iter_2.pth", "log.jsonl"]
    _same_training_state(run / "iter_2.pth", reference / "iter_2.pth")
    monkeypatch.undo()
    _train("--data", str(data), "--out", str(run), "--resume", "auto", *RUN_ARGS)
    _same_training_state(run / "final.pth", reference / "final.pth")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("fault", [pytest.param("step:2", id="dies"),
                                   pytest.param("hang:2", id="hangs")])
def test_rank_that_stops_ends_the_others(data, tmp_path, fault):
    """Rank 1 dies (SIGKILL) or stops answering at its second iteration; rank 0 must end with
    a one-line error within a bounded time (--dist-timeout for the hang)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    port, timeout_s = _free_port(), 8
    procs = []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": "lo"}
        cmd = [sys.executable, str(ROOT / "tests" / "train_with_faults.py"), "--fault", fault,
               "--fault-rank", "1", "--data", str(data), "--out", str(tmp_path / "run"),
               *RUN_ARGS, "--batch-size", "1", "--dist-timeout", str(timeout_s)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    t0 = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: process 0 of 2 lost the others"), err
    assert "Traceback" not in err, err
    assert elapsed < 120
