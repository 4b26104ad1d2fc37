"""benchmarks/compare_runs.py: two runs agree when everything but the clock agrees."""

import json
import subprocess
import sys

from .conftest import ROOT


def fake_run(folder, loss: float, minutes: float, weights: bytes) -> None:
    (folder / "stage1" / "final").mkdir(parents=True)
    (folder / "stage1" / "final" / "model.safetensors").write_bytes(weights)
    rows = [{"step": 10, "time": minutes * 60, "train/loss": loss, "perf/tokens_per_s": 1000 / minutes}]
    (folder / "stage1" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = {"created": f"2026-01-01 00:{minutes:02.0f}:00", "summary": {"speed_vs_ar": 2 / minutes},
              "stages": {"stage1": {"train_minutes": minutes, "pass@1": {"heldout": {"value": 0.25}}}}}
    (folder / "report.json").write_text(json.dumps(report))


def compare(a, b):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_runs.py"), str(a), str(b)],
                          capture_output=True, text=True)


def test_runs_differing_only_in_wall_clock_are_identical_and_a_changed_loss_or_weight_is_not(tmp_path):
    fake_run(tmp_path / "a", 1.5, 3.0, b"w")
    fake_run(tmp_path / "b", 1.5, 7.0, b"w")  # slower machine: every timing differs
    fake_run(tmp_path / "c", 1.25, 3.0, b"w")  # one logged loss differs
    fake_run(tmp_path / "d", 1.5, 3.0, b"x")  # the exported weights differ
    same = compare(tmp_path / "a", tmp_path / "b")
    assert same.returncode == 0 and same.stdout.startswith("identical"), same.stdout + same.stderr
    loss = compare(tmp_path / "a", tmp_path / "c")
    assert loss.returncode == 1 and "train/loss" in loss.stdout, loss.stdout
    weights = compare(tmp_path / "a", tmp_path / "d")
    assert weights.returncode == 1 and "stage1/final/model.safetensors" in weights.stdout, weights.stdout
