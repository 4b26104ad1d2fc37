"""Stage 3's claim at small scale: constrained-order distillation against plain mask training given the
same extra compute, from the same starting model.

    python benchmarks/stage3_order.py --out benchmarks/results/stage3/stage3_order.json

1. Stage 3 runs as a user would run it (`onpolicy train recipes/tiny/stage3_order.yaml`); its compute
   is the pool's sampling and verification time plus the distillation steps' time (validation passes
   excluded), read from its pool header and metrics.
2. The baseline continues the same starting model with stage-1 mask training (`recipes/tiny/stage2_edit.yaml`
   with `diffusion.edit_fraction=0`) for as many steps as fit in that time, at the seconds per step
   measured here by a short calibration run of that recipe (`--mask-step-seconds` to give it).
   Nothing else should run on the machine meanwhile.
3. The starting model, stage 3 and the baseline are measured on validation and held-out generated
   tasks through `onpolicy eval`'s path (greedy; one token per step, and threshold 0.5): pass@1 with
   95% Wilson intervals, tokens per forward.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "onpolicy.cli", *cmd], cwd=ROOT, check=True)


def stage3_seconds(out: Path) -> float:
    header = json.loads((out / "pool.jsonl").open().readline())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in steps if "time/step" in m]
    log_every = logged[1]["step"] - logged[0]["step"] if len(logged) > 1 else 1
    return header["seconds"] + sum(m["time/step"] * log_every for m in logged)


def mask_step_seconds(args) -> float:
    """Seconds per step of the baseline's recipe on this machine: a short calibration run (its first
    step, with start-up, left out)."""
    if args.mask_step_seconds:
        return args.mask_step_seconds
    calib = args.runs / "calibration"
    if not (calib / "metrics.jsonl").is_file():
        run(["train", "recipes/tiny/stage2_edit.yaml", "diffusion.edit_fraction=0", "train.max_steps=8",
             "train.save_every=0", "train.eval_every=0", "train.eval_batches=1", "logging.log_every=1",
             f"logging.output_dir={calib}", "logging.progress=false"])
    rates = [m["perf/tokens_per_s"]
             for m in map(json.loads, (calib / "metrics.jsonl").read_text().splitlines())
             if "perf/tokens_per_s" in m and m["step"] > 1]
    return 16 * 256 / (sum(rates) / len(rates))  # the recipe's micro batch x sequence length


def measure(folder: Path, limit: int) -> dict:
    from onpolicy.data.tasks import load_task_set
    from onpolicy.evaluation import evaluate_checkpoint
    from onpolicy.loading import load_model
    from onpolicy.sampling import SamplerConfig
    from verifiers import PythonTestVerifier

    model, tokenizer = load_model(str(folder))
    model.eval()
    out = {}
    with PythonTestVerifier() as verifier:
        for split in ("validation", "heldout"):
            tasks = load_task_set(f"generated:{split}", limit, 0)
            for name, cfg in (("one_per_step", SamplerConfig(max_new_tokens=96)),
                              ("threshold_0.5", SamplerConfig(max_new_tokens=96, threshold=0.5))):
                r = evaluate_checkpoint(model, tokenizer, tasks, cfg, 1, verifier, 8, 0)
                out[f"{split}/{name}"] = {"pass@1": r["pass@1"], "pass@1_ci95": r["pass@1_ci95"],
                                          "tokens_per_forward": r["tokens_per_forward"], "n": len(tasks)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "stage3-bench")
    p.add_argument("--limit", type=int, default=150)
    p.add_argument("--mask-step-seconds", type=float, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stage3_order.json")
    args = p.parse_args()

    per_step = mask_step_seconds(args)
    order = args.runs / "order"
    if not (order / "final" / "config.json").is_file():
        run(["train", "recipes/tiny/stage3_order.yaml", f"logging.output_dir={order}",
             "logging.progress=false"])
    seconds = stage3_seconds(order)
    steps = max(1, round(seconds / per_step))
    mask = args.runs / "mask"
    if not (mask / "final" / "config.json").is_file():
        run(["train", "recipes/tiny/stage2_edit.yaml", "diffusion.edit_fraction=0",
             f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
             f"train.save_every={steps}", f"train.eval_every={steps}", f"logging.output_dir={mask}",
             "logging.progress=false"])
    header = json.loads((order / "pool.jsonl").open().readline())
    start = json.loads((order / "summary.json").read_text())
    models = {"start": ROOT / "runs" / "tiny-tasks-from-ar-b4" / "final", "stage3": order / "final",
              "mask_same_compute": mask / "final"}
    results = {name: measure(folder, args.limit) for name, folder in models.items()}
    report = {"compute": {"stage3_seconds": round(seconds, 1), "mask_seconds_per_step": round(per_step, 2),
                          "mask_steps": steps, "pool": {k: header[k] for k in ("n_tasks", "samples",
                                                                               "decoded", "passed",
                                                                               "prompts_with_a_pass", "kept",
                                                                               "seconds")},
                          "stage3_steps": start["steps"]},
              "models": {k: str(v) for k, v in models.items()}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
