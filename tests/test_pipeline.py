"""The main job in miniature: every stage through `onpolicy pipeline`, a few steps each, the report,
and a re-run that skips what is finished."""

import json

import pytest
import yaml

from .conftest import run_cli

SMALL = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
         "tokenizer.vocab_size=400", "data.max_files=20", "data.max_tasks=400", "data.seq_len=64",
         "train.micro_batch_size=4", "train.eval_batches=1", "train.warmup_steps=1", "train.max_steps=2",
         "train.save_every=1"]
TOY = ["train.max_steps=2", "train.micro_batch_size=2", "train.warmup_steps=1", "validation.n_tasks=2"]


def mini_pipeline(tmp_path, cache):
    data = [f"data.cache_dir={cache}"]
    return {
        "name": "mini",
        "output_dir": str(tmp_path / "run"),
        "stages": [
            {"name": "ar", "recipe": "recipes/tiny/tasks_ar.yaml", "overrides": [*SMALL, *data]},
            {"name": "stage1", "recipe": "recipes/tiny/tasks_from_ar.yaml", "init_from": "ar",
             "overrides": [*SMALL, *data, "model.block_size=4"]},
            {"name": "stage2", "recipe": "recipes/tiny/stage2_edit.yaml", "init_from": "stage1",
             "overrides": [*SMALL, *data]},
            {"name": "stage3", "recipe": "recipes/tiny/stage3_order.yaml", "init_from": "stage2",
             "overrides": [*TOY, "pool.n_tasks=4", "pool.samples=2", "pool.require_pass=false",
                           "pool.sampler.max_new_tokens=8"]},
            {"name": "stage4", "recipe": "recipes/tiny/stage4_onpolicy.yaml", "init_from": "stage3",
             "overrides": [*TOY, "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.n_tasks=8",
                           "rollout.batch_size=4", "rollout.sampler.max_new_tokens=8",
                           "rollout.verifier=tests.plugins:CoinVerifier", "validation.every=1"]},
        ],
        "eval": {"limit": 4, "max_new_tokens": 8},
        "bench": {"ar": "ar", "before": "stage1", "after": "stage4", "limit": 2, "thresholds": [0.5],
                  "batch_sizes": [1, 2], "validation": "generated:heldout:seed=0:skip=2",
                  # a tolerance every setting meets: the verdict path runs to its sentence
                  "validation_limit": 2, "choose_from": [0.0], "tolerance": 1.0},
    }


@pytest.mark.slow
def test_miniature_pipeline_end_to_end_and_rerun_skips(tmp_path):
    """kill -9 in the middle of stage 1 (once it has a checkpoint), run again: stage 1 resumes from it,
    the rest runs, the report is written; a third run skips everything."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import ROOT

    spec = tmp_path / "mini.yaml"
    pipe = mini_pipeline(tmp_path, tmp_path / "cache")
    pipe["stages"][1]["overrides"] += ["train.max_steps=20"]  # long enough to be killed half way
    spec.write_text(yaml.safe_dump(pipe))
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "onpolicy.cli", "pipeline", str(spec)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while not list((out / "stage1" / "checkpoints").glob("step_*/MANIFEST.json")):
        assert (first.poll() is None
                and time.monotonic() < deadline), "the pipeline ended before stage 1 checkpointed"
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)  # our own child, by its pid
    first.wait()
    assert not (out / "stage1" / "final").exists()
    r = run_cli("pipeline", str(spec), timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    assert ("1/5 ar: finished earlier, skipped" in r.stdout
            and "(resuming from its last checkpoint)" in r.stdout)
    assert "resumed at step" in (out / "stage1" / "pipeline.log").read_text()
    assert "estimate" in r.stdout and "[pipeline] 5/5 stage4" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"name", "stages", "ar_comparison", "summary", "plots", "machine"}
    assert list(report["stages"]) == ["ar", "stage1", "stage2", "stage3", "stage4"]
    for row in report["stages"].values():
        assert set(row["pass@1"]) == {"validation", "heldout", "repair"}
        assert all(len(v["ci95"]) == 2 and 0 <= v["value"] <= 1 for v in row["pass@1"].values())
        assert row["tokens_per_forward"]["one_per_step"] > 0 and row["train_minutes"] > 0
    assert report["stages"]["stage4"]["model"].endswith("best")  # stage 4 hands on its best checkpoint
    best_step = report["stages"]["stage4"]["best_step"]  # which one (0: its start), said in the report too
    assert best_step == json.loads((out / "stage4" / "summary.json").read_text())["best"].get("step", 0)
    assert "stage4 hands on `best/`" in (out / "report.md").read_text()
    comparison = report["ar_comparison"]
    assert comparison["ar_tokens_per_s"] > 0 and comparison["fastest"]["speed_vs_ar"] > 0
    # the numbers are what `onpolicy bench` wrote and what `onpolicy eval` prints for the same model
    bench = json.loads((out / "bench.json").read_text())
    assert comparison["ar_pass@1"] == bench["results"]["ar"]["pass_at_1"]
    row = report["stages"]["stage1"]
    r = run_cli("eval", row["model"], "--tasks", "generated:heldout", "--limit", "4", "--max-new-tokens", "8",
                "--out", str(tmp_path / "eval.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["pass@1"] == row["pass@1"]["heldout"]["value"]
    assert ev["tokens_per_forward"] == pytest.approx(row["tokens_per_forward"]["one_per_step"])
    # the verdict: its setting chosen on validation (choice.json), its numbers those of bench.json
    claim, choice = report["verdict"], json.loads((out / "choice.json").read_text())
    # every token at once: the fewest forwards
    assert claim["setting"]["threshold"] == choice["chosen"]["threshold"] == 0.0
    assert claim["pass@1"] == bench["results"][claim["setting"]["name"]]["pass_at_1"]
    assert claim["speed_vs_ar"] == bench["results"][claim["setting"]["name"]]["speed_vs_ar"]
    name = claim["setting"]["name"]
    assert claim["batches"]["2"]["speed_vs_ar"] == bench["batches"]["2"][name]["speed_vs_ar"]
    assert (out / "report.md").read_text().startswith("**Claim ")
    assert set(report["compute"]) == {"ar", "stage1", "stage2", "stage3", "stage4"}
    assert all(c["train_flops"] > 0 for c in report["compute"].values())
    assert ("passed its tests" in (out / "replay.html").read_text()
            or "failed its tests" in (out / "replay.html").read_text())
    for name in ("losses.png", "stages.png", "frontier.png", "onpolicy.png", "replay.html", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    # a re-run skips every finished stage and reuses the evaluations
    r = run_cli("pipeline", str(spec), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.count("finished earlier, skipped") == 5 and "done, skipped" in r.stdout


def test_pipeline_file_errors_name_the_problem(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"stages": [{"name": "a", "recipe": "recipes/tiny/tasks_ar.yaml",
                                                "init_from": "b"}]}))
    r = run_cli("pipeline", str(spec), "--plan")
    assert r.returncode == 2 and "starts from 'b', which is not an earlier stage" in r.stderr
    spec.write_text(yaml.safe_dump({"stages": [{"name": "a", "recipe": "nope.yaml"}]}))
    r = run_cli("pipeline", str(spec), "--plan")
    assert r.returncode == 2 and "recipe not found: nope.yaml" in r.stderr
    spec.write_text(yaml.safe_dump({"stagez": []}))
    r = run_cli("pipeline", str(spec), "--plan")
    assert r.returncode == 2 and "unknown key 'stagez'" in r.stderr
    r = run_cli("pipeline", "recipes/tiny/pipeline.yaml", "--plan")
    assert r.returncode == 0 and "estimate: ~" in r.stdout and "stage4" in r.stdout


def test_a_cached_bench_is_stale_once_a_compared_stage_is_rerun(tmp_path):
    """bench.json is reused on a re-run only while the models it compares are older than it."""
    import os

    from onpolicy.pipeline import newer_than

    runs = []
    for name in ("ar", "stage4"):
        (tmp_path / name / "final").mkdir(parents=True)
        (tmp_path / name / "final" / "config.json").write_text("{}")
        runs.append(tmp_path / name)
    bench = tmp_path / "bench.json"
    bench.write_text("{}")
    os.utime(bench, (2e9, 2e9))
    for run in runs:
        os.utime(run / "final" / "config.json", (1e9, 1e9))
    assert not newer_than(bench, runs)
    os.utime(runs[1] / "final" / "config.json", (3e9, 3e9))  # stage 4 re-run after the bench
    assert newer_than(bench, runs)


def test_ar_comparison_counts_a_setting_exactly_two_points_under_ar():
    from onpolicy.report import ar_comparison

    def row(model, tps, p):
        return {"model": model, "tokens_per_s": tps, "speed_vs_ar": tps / 100, "pass_at_1": p,
                "tokens_per_forward": tps / 100}

    bench = {"checkpoint": "m", "tasks": "generated:heldout", "n_tasks": 300,
             "results": {"ar": row("ar", 100, 42 / 300), "t0.9": row("diffusion", 150, 36 / 300),
                         "t0.5": row("diffusion", 250, 35 / 300)}}
    # 36/300 is exactly 2 points under 42/300
    assert ar_comparison(bench)["fastest_within_2_points"]["setting"] == "t0.9"
    assert ar_comparison(bench)["fastest"]["setting"] == "t0.5"
