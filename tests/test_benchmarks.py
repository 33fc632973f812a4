"""Smoke tests of the benchmark scripts and of the synthesized pruning pattern they time.

The scripts run by path (``benchmarks/`` is not a package) in a subprocess with this Python,
from the repository root, with ``TRITON_INTERPRET`` removed so that nothing runs under the
Triton interpreter. No timing is asserted: speed lives in the benchmarks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dtop_kernels
from dtop_kernels.models import vit_dtop_tiny

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DTOP_BACKEND")}
    # The subprocess imports the same dtop_kernels as this test (installed, or this checkout).
    where = str(Path(dtop_kernels.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (where, env.get("PYTHONPATH")) if p)
    # One thread: on a busy CI machine OpenMP barriers stall tiny ops for whole time slices.
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", *args], check=False,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    assert {"environment", "rows"} <= data.keys()
    assert data["rows"]
    return data["rows"]


def test_latency_quick(tmp_path: Path) -> None:
    extra = []
    if importlib.util.find_spec("matplotlib") is not None:
        extra = ["--plot", str(tmp_path / "sweep.png")]
    out = _run("latency.py", "--quiet", "--sweep", "1.0", "0.7", "--json",
               str(tmp_path / "latency.json"), "--csv", str(tmp_path / "latency.csv"), *extra)
    head = out.stdout.splitlines()
    assert head[0].startswith("device:") and "torch:" in head[0] and "dtype:" in head[0]
    # the compact table: these columns only, narrow enough to read
    assert head[1].split() == ["B", "mode", "tokens/stage", "GFLOPs", "saving", "%", "ms",
                               "speedup", "realized", "[80%", "interval]"]
    assert max(len(ln) for ln in head[1:8]) <= 110
    for mode in ("dense (SDPA)", "loop (official per-image)", "packed/torch"):
        assert mode in out.stdout
    assert "WARNING" not in out.stdout and "columns:" not in out.stdout
    tail = out.stdout.splitlines()[-2:]  # how far to trust it, then the verdict: one line each
    assert tail[0].startswith("trust: none: --quick")
    assert tail[1].startswith("verdict: at batch 2, packed/torch takes ")
    assert "fixed per-call costs" in tail[1] and "where it is meant to pay" in tail[1]
    rows = _rows(tmp_path / "latency.json")
    modes = {(r["mode"], r["keep"]) for r in rows}
    assert {("dense (SDPA)", None), ("loop (official per-image)", 0.7),
            ("packed/torch", 1.0), ("packed/torch", 0.7)} <= modes
    assert all(r["ms"] > 0 and r["gflops"] > 0 and r["logits_ms"] > 0 for r in rows)
    assert all(r["logits_realized"] is not None for r in rows if r["keep"] == 0.7)
    assert (tmp_path / "latency.csv").read_text().startswith("model,res,batch,mode,")
    if extra:
        assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ops_quick(tmp_path: Path) -> None:
    out = _run("ops.py", "--json", str(tmp_path / "ops.json"))
    assert out.stdout.startswith("device:")
    for title in ("op", "impl", "ms", "GB/s", "TFLOP/s"):
        assert title in out.stdout.splitlines()[1]
    assert {r["op"] for r in _rows(tmp_path / "ops.json")} >= {"copy", "gather_tokens"}


def _ops_module():
    return _bench_module("ops")


def test_ops_measured_orders_rank_by_summed_time():
    ops = _ops_module()

    def r(shape, op, be, ms):
        return {"shape": shape, "op": op, "impl": f"x {be}", "backend": be, "ms": ms}

    rows = [r("B1", "attention fwd", "torch", 1.0), r("B8", "attention fwd", "torch", 8.0),
            r("B1", "attention fwd", "triton", 2.0), r("B8", "attention fwd", "triton", 5.0),
            r("B1", "attention fwd", "cuda", 0.1),  # could not run at B8: ranked last
            r("B1", "mlp fwd", "torch", 3.0), r("B8", "mlp fwd", "torch", 9.0),
            r("B1", "attention bwd", "triton", 0.1), r("B8", "attention bwd", "triton", 0.1),
            {"shape": "B1", "op": "attention fwd", "impl": "peer", "ms": 0.01}]
    assert ops.measured_orders(rows) == {"varlen_attention": ["triton", "torch", "cuda"],
                                         "packed_linear": ["torch"]}


def _bench_module(script: str):
    """benchmarks/<script>.py imported by path (``benchmarks/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{script}", BENCH / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _synth():
    return _bench_module("synth")


@pytest.mark.parametrize("keep", [1.0, 0.75, 0.5])
def test_synthesized_exits_prune_the_planned_counts(keep: float) -> None:
    """The real exit rule (loop and packed) prunes exactly the synthesized plan, and the images
    of a batch keep different counts."""
    synth = _synth()
    model = vit_dtop_tiny(num_classes=8).eval()
    b, grid = 3, (16, 16)
    plan = synth.plan_exits(b, grid, model.num_classes, model.num_stages, keep,
                            threshold=model.threshold, top_k=model.top_k, seed=3)
    want = synth.target_counts(256, synth.image_keeps(b, keep), model.num_stages)
    assert torch.equal(plan.counts, want)
    if keep < 1:
        assert len(set(plan.counts[-1].tolist())) == b
    for s in range(model.num_stages):  # exit_stage agrees with the counts
        assert torch.equal((plan.exit_stage >= s).sum(1), plan.counts[s])
    img = torch.randn(b, 3, 256, 256)
    with torch.no_grad():
        for mode in ("loop", "packed"):
            out = model(img, mode=mode, backend="torch", exit_logits=plan.exit_logits)
            assert torch.equal(out.active_counts, plan.counts), mode
            assert torch.equal(out.exit_stage.view(b, -1), plan.exit_stage), mode


def _latency_module():
    return _bench_module("latency")


def _row(mode: str, keep, samples: list[float], saving: float = 0.0) -> dict:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=5)
    return {"batch": 1, "mode": mode, "keep": keep, "ms": statistics.median(samples),
            "p20": q[0], "p80": q[3], "flop_saving": saving, "samples_ms": samples,
            "repeats": len(samples)}


def test_spread_warnings_flag_noisy_rows_and_load() -> None:
    lat = _latency_module()
    tight_dense = [100 + 0.1 * i for i in range(-5, 6)]
    tight_packed = [80 + 0.1 * i for i in range(-5, 6)]
    quiet = [_row("dense (SDPA)", None, tight_dense), _row("packed/torch", 0.7, tight_packed, 20)]
    assert lat.spread_warnings(quiet, threads=2, load=(1.9, 1.0, 1.0)) == []
    # realized = (1 - 80/100) / 0.2 = 1.0, known to within the bootstrap of tight samples
    lo, hi = lat.realized_interval(quiet[1], quiet[0])
    assert 0.97 < lo <= 1.0 <= hi < 1.03
    spread_dense = [90, 95, 100, 105, 110, 115, 85, 100, 100, 120, 80]
    noisy = [_row("dense (SDPA)", None, spread_dense), _row("packed/torch", 0.7, tight_packed, 20)]
    warn = lat.spread_warnings(noisy, threads=2, load=(1.0, 1.0, 1.0))
    assert len(warn) == 3 and "dense (SDPA)" in warn[0] and "> 1.1" in warn[0]
    assert "packed/torch" in warn[1] and "bootstrap interval" in warn[1]
    lo, hi = lat.realized_interval(noisy[1], noisy[0])
    assert hi - lo > 0.2
    loaded = lat.spread_warnings(quiet, threads=1, load=(3.0, 3.0, 3.0))
    assert len(loaded) == 2 and "load average 3.0" in loaded[0]


def test_trust_is_one_line() -> None:
    lat = _latency_module()
    tight = [_row("dense (SDPA)", None, [100 + 0.1 * i for i in range(-5, 6)]),
             _row("packed/torch", 0.7, [80 + 0.1 * i for i in range(-5, 6)], 20)]
    tight[1]["realized"] = 1.0
    lat.add_intervals(tight)
    assert tight[1]["realized_text"].startswith("1.00 [0.9")
    line = lat.trust_line(tight, threads=2, load=(1.0, 1.0, 1.0))
    assert line.startswith("trust: good: every realized fraction known to within 0.0")
    spread = [90, 95, 100, 105, 110, 115, 85, 100, 100, 120, 80]
    noisy = [_row("dense (SDPA)", None, spread), dict(tight[1])]
    lat.add_intervals(noisy)
    line = lat.trust_line(noisy, threads=1, load=(3.0, 3.0, 3.0))
    assert line.startswith("trust: low: the realized fraction of B=1 packed/torch lies anywhere")
    assert "p80/p20 up to" in line and "CPU load 3.0" in line and "\n" not in line


def test_verdict_at_batch_1_says_there_is_nothing_to_batch() -> None:
    lat = _latency_module()
    rows = [dict(_row("dense (SDPA)", None, [1500.0] * 5), res=512),
            dict(_row("loop (official per-image)", 0.684, [1222.0] * 5, 21.0), res=512),
            dict(_row("packed/torch", 0.684, [1250.0] * 5, 21.0), res=512)]
    line = lat.verdict(rows, gpu=False, quick=False)
    assert line.startswith("verdict: at batch 1, packed/torch takes 1250 ms, the per-image loop "
                           "1222 ms, dense 1500 ms, for 21% fewer FLOPs than dense")
    assert "nothing to batch" in line and "on a GPU" in line and "docs/benchmarks.md" in line


def test_cli_optional_dependency_fails_before_the_work() -> None:
    """Without matplotlib, --plot and pruning_maps stop at once with the install command."""
    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(dtop_kernels.__file__).resolve().parents[1])
    for cmd in ([str(BENCH / "latency.py"), "--sweep", "--plot", "x.png"],
                ["-m", "dtop_kernels.models.pruning_maps", "--out", "unused"],
                [str(ROOT / "examples" / "dtop_model_tour.py"), "--maps", "unused"]):
        proc = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 2, (cmd, proc.stderr)
        assert "needs matplotlib" in proc.stderr and "pip install matplotlib" in proc.stderr
        assert not Path("unused").exists()


@pytest.mark.parametrize("cmd", [
    pytest.param([str(BENCH / "latency.py")], id="latency"),
    pytest.param([str(BENCH / "ops.py")], id="ops"),
    pytest.param(["-m", "dtop_kernels.models.pruning_maps"], id="pruning_maps"),
    pytest.param([str(ROOT / "examples" / "dtop_model_tour.py")], id="tour"),
    pytest.param(["-m", "dtop_kernels.train"], id="train"),
    pytest.param(["-m", "dtop_kernels.evaluate"], id="evaluate"),
    pytest.param(["-m", "dtop_kernels.deploy"], id="export"),
    pytest.param(["-m", "dtop_kernels.data.synthetic"], id="synthetic_data"),
    pytest.param([str(ROOT / "examples" / "train_synthetic.py")], id="train_synthetic"),
])
def test_cli_help_documents_every_option(cmd: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(dtop_kernels.__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, *cmd, "--help"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("options:")[1].splitlines()
    options = [i for i, ln in enumerate(lines) if ln.startswith("  -")]
    assert len(options) > 2
    for i in options:
        # argparse puts an option's help after its signature, or on the next, deeper line
        same_line = len(lines[i].strip().split("  ", 1)) == 2
        next_line = i + 1 < len(lines) and lines[i + 1].startswith("   ") \
            and lines[i + 1].strip()
        assert same_line or next_line, f"{lines[i].strip()} has no help text"


def test_console_scripts_name_the_entry_points() -> None:
    """pyproject.toml's commands point at the entry points' main (as ``-m`` runs them)."""
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"dtop-train": "dtop_kernels.train:main",
                       "dtop-evaluate": "dtop_kernels.evaluate:main",
                       "dtop-export": "dtop_kernels.deploy:main",
                       "dtop-synthetic-data": "dtop_kernels.data.synthetic:main"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_latency_learned_pruning(tmp_path: Path) -> None:
    """--checkpoint --data: the trained heads prune validation images; the legend and checks
    stay."""
    pytest.importorskip("PIL", reason="--data reads images with Pillow")
    from dtop_kernels.data.synthetic import write_synthetic_dataset
    from dtop_kernels.train import main as train_main

    data, run = tmp_path / "data", tmp_path / "run"
    write_synthetic_dataset(data, train=2, val=2, num_classes=3, height=(64, 70),
                            width=(64, 80))
    train_main(["--data", str(data), "--out", str(run), "--arch", "tiny", "--iters", "1",
                "--crop", "64", "--scale", "128", "64", "--workers", "0", "--quiet"])
    out = _run("latency.py", "--quiet", "--full", "--checkpoint", str(run / "final.pth"),
               "--data", str(data), "--json", str(tmp_path / "learned.json"))
    assert "pruning learned: the checkpoint's heads at threshold 0.9" in out.stdout
    assert "columns:" in out.stdout and "checks passed" in out.stdout  # --full: the legend
    for title in ("p20", "p80", "logits ms", "realized logits", "peak MiB", "syncs"):
        assert title in out.stdout.splitlines()[1]
    assert "+ CUDA graph rows: GPU only" in out.stdout
    rows = _rows(tmp_path / "learned.json")
    assert {r["mode"] for r in rows} >= {"dense (SDPA)", "loop (official per-image)",
                                         "packed/torch"}
    assert all(r["model"] == "checkpoint (final.pth)" and r["res"] == 64 for r in rows)


def _failing_packed_model():
    """The tiny model, whose packed forward raises (a kernel that crashes on some device)."""
    model = vit_dtop_tiny(num_classes=8)
    forward = model.forward

    def broken(*args, mode: str = "dense", **kwargs):
        if mode == "packed":
            raise RuntimeError("boom in the packed forward")
        return forward(*args, mode=mode, **kwargs)

    model.forward = broken
    return model


def test_latency_json_records_a_failed_row(tmp_path: Path, monkeypatch) -> None:
    """A row that raises is recorded with its error; the others are timed and the JSON written."""
    lat = _bench_module("latency")
    monkeypatch.setattr(lat, "QUICK", (_failing_packed_model, *lat.QUICK[1:]))
    monkeypatch.setattr(lat, "BACKENDS", ["torch"])
    monkeypatch.setattr(lat, "triton_interpreted", lambda: False)
    lat.main(["--quick", "--quiet", "--keep", "0.7", "--json", str(tmp_path / "latency.json")])
    assert json.loads((tmp_path / "latency.json").read_text())["complete"] is True
    rows = _rows(tmp_path / "latency.json")
    failed = [r for r in rows if r.get("error")]
    assert [r["mode"] for r in failed] == ["packed/torch"]
    assert failed[0]["ms"] is None and "boom" in failed[0]["error"]
    timed = {r["mode"] for r in rows if r["ms"]}
    assert {"dense (SDPA)", "loop (official per-image)"} <= timed


def test_ops_json_records_a_failed_row(tmp_path: Path, monkeypatch) -> None:
    ops = _ops_module()
    attention = ops.dk.varlen_attention

    def broken(*args, backend: str = "auto", **kwargs):
        if backend == "torch":
            raise RuntimeError("boom in attention")
        return attention(*args, backend=backend, **kwargs)

    monkeypatch.setattr(ops.dk, "varlen_attention", broken)
    monkeypatch.setattr(ops, "BACKENDS", ["torch"])
    ops.main(["--quick", "--json", str(tmp_path / "ops.json")])
    assert json.loads((tmp_path / "ops.json").read_text())["complete"] is True
    rows = _rows(tmp_path / "ops.json")
    failed = [r for r in rows if r.get("error")]
    assert [(r["op"], r["impl"]) for r in failed] == [("attention fwd", "varlen torch"),
                                                     ("attention bwd", "varlen torch")]
    assert all("boom" in r["error"] and "boom" in r["note"] for r in failed)
    assert any(r["op"] == "mlp fwd" and r["ms"] for r in rows)


def _sigterm_once_rows_exist(partial: dict, real):
    """``real``, but once ``partial`` holds a row: SIGTERM to this process (as a time limit
    sends it), then a wait that the signal ends."""
    import signal
    import time

    def call(*args, **kwargs):
        if partial.get("rows"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
            raise AssertionError("SIGTERM did not stop the benchmark")
        return real(*args, **kwargs)
    return call


@pytest.mark.parametrize("script", ["latency", "ops"])
def test_sigterm_writes_the_rows_measured_so_far(script: str, tmp_path: Path,
                                                 monkeypatch) -> None:
    """A run ended by SIGTERM (a time limit) writes its JSON with the rows measured so far,
    marked incomplete, and exits with a message saying so; a whole run is marked complete."""
    import signal

    mod = _bench_module(script)
    monkeypatch.setattr(mod, "BACKENDS", ["torch"])
    timer = "time_interleaved" if script == "latency" else "time_fn"
    real_bench, real_timer = mod.bench, getattr(mod, timer)

    def bench(args, partial):
        monkeypatch.setattr(mod, timer, _sigterm_once_rows_exist(partial, real_timer))
        return real_bench(args, partial)

    monkeypatch.setattr(mod, "bench", bench)
    argv = ["--quick", "--json", str(tmp_path / "out.json")]
    if script == "latency":
        monkeypatch.setattr(mod, "triton_interpreted", lambda: False)
        argv += ["--quiet", "--batch", "1", "2"]
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit, match="SIGTERM"):
            mod.main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["complete"] is False and data["rows"]
    assert "SIGTERM" in data["notes"][-1]
    if script == "latency":
        assert {r["batch"] for r in data["rows"]} == {1}  # batch 2 never finished


def test_readme_sample_is_what_show_prints() -> None:
    """The README's benchmark sample is a saved run as ``latency.py --show`` prints it."""
    saved = BENCH / "results" / "latency-cpu-x86-64-2-threads-20261124-run1.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(dtop_kernels.__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, str(BENCH / "latency.py"), "--show", str(saved)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in (ROOT / "README.md").read_text()
    assert proc.stdout.splitlines()[-2].startswith("trust: good")
