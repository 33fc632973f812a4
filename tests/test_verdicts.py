"""The verdict lines that end the example runs: what the run shows, why, and where it pays."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tour_verdict_explains_a_slow_packed_run() -> None:
    tour = _example("dtop_model_tour")
    line = tour.verdict({"dense": 5.7, "loop": 17.8, "packed": 13.7}, 0.2, 15e6)
    assert line.startswith("verdict: pruning saved 20% of the FLOPs, and packed took 14 ms "
                           "against 6 ms dense: a tiny model (15 MFLOPs per image)")
    assert "python benchmarks/latency.py" in line and "\n" not in line
    fast = tour.verdict({"dense": 20.0, "loop": 17.8, "packed": 13.7}, 0.2, 15e6)
    assert "tiny model" not in fast


def _report(exited: list[float], saving: float, miou: float) -> dict:
    return {"rows": [
        {"setting": "dense", "mIoU": 0.5, "flop_saving": 0.0, "exited_share_per_head": [0, 0]},
        {"setting": "dtop@0.7", "mIoU": miou, "flop_saving": saving,
         "exited_share_per_head": exited}]}


def test_training_smoke_verdict_says_why_nothing_exited() -> None:
    ts = _example("train_synthetic")
    line = ts.verdict(_report([0.0, 0.0], -0.046, 0.5), 0.7, 20)
    assert line.startswith("verdict: at p0 = 0.7 after 20 iterations 0% of the tokens exited, "
                           "FLOP saving -4.6%, mIoU 50.0 vs 50.0 dense")
    assert "not yet confident" in line and "docs/training.md" in line
    full = ts.verdict(_report([0.2, 0.1], 0.22, 0.861), 0.7, 1800)
    assert "not yet confident" not in full and "full run" not in full


def test_training_example_runs_to_its_verdict(tmp_path: Path) -> None:
    """The example end to end as a user runs it (data, training, evaluation), at its smoke
    size: it ends with the verdict line, built from the report the evaluation wrote."""
    import json
    import os
    import subprocess

    import pytest

    pytest.importorskip("PIL")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train_synthetic.py"), "--out",
                           str(tmp_path), "--iters", "2", "--train", "4", "--val", "2"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    report = json.loads((tmp_path / "report.json").read_text())["report"]
    ts = _example("train_synthetic")
    assert last == ts.verdict(report, 0.7, 2)
