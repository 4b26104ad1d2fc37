"""The frontier report's reading of a frontier at a given speed (benchmarks/stage4_frontier.py)."""

import importlib.util
import json
from pathlib import Path


def _frontier():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "stage4_frontier.py"
    spec = importlib.util.spec_from_file_location("stage4_frontier", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pass_at_interpolates_between_measured_settings_and_refuses_outside_them():
    pass_at = _frontier().pass_at
    rows = [{"tokens_per_forward": x, "pass@1": y} for x, y in [(2.0, 0.20), (1.0, 0.30), (3.0, 0.05)]]
    assert pass_at(rows, 1.0) == 0.30
    assert abs(pass_at(rows, 1.5) - 0.25) < 1e-12  # halfway between (1, 0.30) and (2, 0.20)
    assert abs(pass_at(rows, 2.6) - 0.11) < 1e-12  # 0.20 + (0.05 - 0.20) * 0.6
    assert pass_at(rows, 0.9) is None and pass_at(rows, 3.1) is None
    # two settings at the same speed: the better one is the frontier there
    same = rows + [{"tokens_per_forward": 2.0, "pass@1": 0.26}]
    assert pass_at(same, 2.0) == 0.26
    # a setting just slower than a better one is under the frontier, not on it (4 steps per block at 1.83
    # beside threshold 0.9 at 1.84): the line runs from one token per step to the better one
    dominated = [{"tokens_per_forward": x, "pass@1": y} for x,
                 y in [(0.91, 0.150), (1.83, 0.033), (1.84, 0.140), (2.17, 0.110)]]
    assert abs(pass_at(dominated, 1.83) - (0.150 + (0.140 - 0.150) * (1.83 - 0.91) / (1.84 - 0.91))) < 1e-12
    assert (pass_at(dominated, 2.0) > 0.11 and pass_at(dominated, 0.91) == 0.150
            and pass_at(dominated, 2.17) == 0.110)
    # a faster setting as good as a slower one: the frontier is flat up to it
    flat = [{"tokens_per_forward": x, "pass@1": y} for x, y in [(0.95, 0.13), (3.1, 0.14), (3.6, 0.10)]]
    assert (pass_at(flat, 0.95) == 0.14 and pass_at(flat, 2.0) == 0.14
            and abs(pass_at(flat, 3.35) - 0.12) < 1e-12)


def test_fastest_within_counts_a_pass_rate_exactly_at_the_tolerance_edge():
    fastest_within = _frontier().fastest_within
    bar = 42 / 300  # 0.14; 36 / 300 = 0.12 is exactly 2 points below it (0.14 - 0.02 = 0.12000000000000001 in
    # floats)
    rows = [{"model": "m", "setting": "threshold 0.9", "pass@1": 36 / 300, "tokens_per_forward": 2.55},
            {"model": "m", "setting": "threshold 0.8", "pass@1": 35 / 300, "tokens_per_forward": 3.19},
            {"model": "other", "setting": "threshold 0.5", "pass@1": 0.2, "tokens_per_forward": 5.0}]
    assert fastest_within(rows, "m", bar, 0.02)["setting"] == "threshold 0.9"
    assert fastest_within(rows, "m", bar, 0.01) is None


def test_reuse_takes_each_stored_setting_and_leaves_the_missing_ones_to_decode(tmp_path):
    """A quick one-setting report reused for a full frontier gives that setting only: the others are not in
    the lookup, so the report decodes them. Another task set is refused, naming both."""
    import pytest

    earlier_rows = _frontier().earlier_rows
    row = {"model": "quick", "folder": "runs/a/final", "setting": "threshold 0.9", "pass@1": 0.26,
           "tokens_per_forward": 3.4}
    first = tmp_path / "quick.json"
    first.write_text(json.dumps({"tasks": "generated:heldout", "n_tasks": 300, "rows": [row]}))
    second = tmp_path / "full.json"
    second.write_text(json.dumps({"tasks": "generated:heldout", "n_tasks": 300, "rows": [
        {**row, "pass@1": 0.99}, {**row, "setting": "one token per step", "pass@1": 0.263}]}))
    old = earlier_rows([str(first), str(second)], "generated:heldout", 300)
    # the first report named gives a shared setting
    assert old["runs/a/final", "threshold 0.9"] == (str(first), row)
    assert old["runs/a/final", "one token per step"][1]["pass@1"] == 0.263
    assert ("runs/a/final", "threshold 0.7") not in old and ("runs/b/final", "threshold 0.9") not in old
    with pytest.raises(SystemExit, match="300 generated:heldout tasks, not 100 generated:heldout"):
        earlier_rows([str(first)], "generated:heldout", 100)
