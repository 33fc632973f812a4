"""tests/gpu_check.py without a GPU: its commands name real scripts, flags and tests, and its
plumbing (time limits, continuing past failures, one results folder of at most 8 files, the
summary JSON) works. The full ``--dry-run`` runs every step's CPU stand-in (~40 s)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check as gc


def _flags(path: Path) -> set[str]:
    return set(re.findall(r'"(--[a-z][a-z0-9-]*)"', path.read_text()))


@pytest.mark.parametrize("cc", [(9, 0), (8, 0)])
def test_gpu_commands_name_real_scripts_and_flags(cc, tmp_path):
    steps = gc.build_steps(tmp_path, cc, dry=False, workers=8)
    names = [s.name for s in steps]
    assert names == list(gc.EXPECTED) == list(gc.LIMIT)
    by = {s.name: s for s in steps}
    assert by["build"].env["DTOP_CUDA_ARCHS"] == f"{cc[0]}{cc[1]}"
    assert by["build"].cmd[-5:] == ["install", "--no-build-isolation", "--no-deps", "-q", "."]
    assert {"-m", "gpu", "-n", "8"} <= set(by["gpu tests"].cmd)
    for s in steps:
        scripts = [a for a in s.cmd if a.endswith(".py")]
        for script in scripts:
            path = gc.ROOT / script
            assert path.is_file(), f"{s.name}: {script} does not exist"
            used = {a for a in s.cmd[s.cmd.index(script) + 1:] if a.startswith("--")}
            assert used <= _flags(path) | {"--sync-check"}, f"{s.name}: unknown flags"
    assert by["racecheck"].cmd[-3:] == ["--only", "attention", "linear"]
    san = (gc.ROOT / "tests" / "sanitize_cuda.py").read_text()
    assert all(f'"{g}"' in san for g in ("attention", "linear"))
    assert str(tmp_path / "ops.json") in by["ops"].cmd
    assert by["latency"].cmd[-10:-2] == ["--res", "512", "--batch", "1", "8", "--compile",
                                         "dense", "--quiet"]
    # the expected GPU time fits the 8-minute target with margin, steps beside others counted once
    beside = {s.name for s in steps if s.beside_next}
    assert sum(v for k, v in gc.EXPECTED.items() if k not in beside) < 400


def test_steps_time_boxed_and_run_past_failures(tmp_path):
    py = sys.executable
    steps = [gc.Step("ok", [py, "-c", "print('fine')"]),
             gc.Step("slow", [py, "-c", "import time; time.sleep(30)"], beside_next=True),
             gc.Step("fails", [py, "-c", "import sys; print('bad'); sys.exit(3)"]),
             gc.Step("missing", ["/nonexistent/tool"]),
             gc.Step("after", [py, "-c", "print('still runs')"])]
    gc.LIMIT["slow"] = 2
    try:
        t0 = time.monotonic()
        gc.run_steps(steps, deadline_s=60 + gc.RESERVE_S, log_dir=tmp_path)
        took = time.monotonic() - t0
    finally:
        del gc.LIMIT["slow"]
    st = {s.name: s for s in steps}
    assert st["ok"].status == "ok" and "fine" in st["ok"].output
    assert st["slow"].status.startswith("timeout") and took < 15
    assert st["fails"].status == "failed" and st["fails"].rc == 3 and "bad" in st["fails"].output
    assert st["missing"].status == "failed"
    assert st["after"].status == "ok" and "still runs" in st["after"].output

    out = tmp_path / "out"
    out.mkdir()
    summary = gc.write_results(out, steps, {"torch": "x"}, took)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.log", "summary.json"] and len(files) <= gc.MAX_FILES
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary and "error" not in summary
    assert on_disk["steps"][0]["status"] == "ok"
    assert "still runs" in (out / "gpu_check.log").read_text()


def test_deadline_cuts_limits_and_skips(tmp_path):
    py = sys.executable
    steps = [gc.Step("info", [py, "-c", "import time; time.sleep(30)"]),
             gc.Step("syncs", [py, "-c", "pass"])]
    gc.run_steps(steps, deadline_s=gc.RESERVE_S + 1.5, log_dir=tmp_path)
    assert steps[0].status.startswith("timeout") and steps[0].limit <= 1.5
    assert steps[1].status == "skipped: no time left"


def test_too_many_files_is_an_error(tmp_path):
    for i in range(gc.MAX_FILES):
        (tmp_path / f"extra{i}.json").write_text("{}")
    summary = gc.write_results(tmp_path, [], {}, 0.0)
    assert "error" in summary and str(gc.MAX_FILES) in summary["error"]


def test_out_must_be_new(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(SystemExit):
        gc.main(["--dry-run", "--out", str(tmp_path)])
