"""Stage 4's rollout share of a step: rows decoded per-row (now) against the batch in lock-step (before).

    python benchmarks/stage4_rollout_share.py --init runs/pipeline-tiny/stage3/final \\
        --out benchmarks/results/rollout_share/rollout_share_cpu.json

Both arms are `onpolicy train recipes/tiny/stage4_onpolicy_b8.yaml` (the main job's stage 4, its batch:
16 prompts x 4 samples, 32 rows per generate call, soft commits at threshold 0.9) from the same start,
same seed, for `--steps` steps; only `rollout.sampler.per_row` differs. The two decode the same tokens
(tests/test_sampling.py), so both arms train on the same rows and only the seconds differ. Reported
per arm: mean seconds of rollout (decoding), verification and training per step, and the rollout's
share of the step. The arms run one after the other: nothing else should run on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from onpolicy.metrics import step_seconds

ROOT = Path(__file__).resolve().parent.parent
ARMS = {"lock-step (before)": ["rollout.sampler.per_row=false"],
        "per-row (now)": ["rollout.sampler.per_row=true"]}


def run_arm(name: str, args) -> dict:
    out = args.runs / name.split()[0]
    cmd = [sys.executable, "-m", "onpolicy.cli", "train", args.recipe, f"model.init_from={args.init}",
           f"train.max_steps={args.steps}", "train.save_every=1000", "validation.n_tasks=4",
           "validation.every=1000", f"logging.output_dir={out}", "logging.progress=false",
           "train.resume=false", *ARMS[name]]
    print(f"[rollout share] {name}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if "time/rollout" in m][1:]  # the first step warms up
    mean = lambda key: statistics.mean(m[key] for m in steps)  # noqa: E731
    step = statistics.mean(step_seconds(m) for m in steps)
    return {"overrides": ARMS[name], "steps_timed": len(steps), "rollout_s": mean("time/rollout"),
            "verify_s": mean("time/verify"), "train_s": mean("time/train"), "step_s": step,
            "rollout_share": mean("time/rollout") / step,
            "rollout_tokens_per_forward": mean("rollout/tokens_per_forward"),
            "rollout_pass_rate": mean("rollout/pass_rate")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="the starting model (the main job's stage-3 model)")
    p.add_argument("--recipe", default="recipes/tiny/stage4_onpolicy_b8.yaml")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "rollout-share")
    p.add_argument("--out", type=Path,
                   default=ROOT / "benchmarks" / "results" / "rollout_share" / "rollout_share_cpu.json")
    args = p.parse_args()
    arms = {name: run_arm(name, args) for name in ARMS}
    before, now = arms["lock-step (before)"], arms["per-row (now)"]
    report = {"benchmark": "stage4_rollout_share", "init": args.init, "recipe": args.recipe,
              "steps": args.steps, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "arms": arms, "rollout_speedup": before["rollout_s"] / now["rollout_s"],
              "step_speedup": before["step_s"] / now["step_s"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for name, a in arms.items():
        print(f"{name:<20} rollout {a['rollout_s']:6.2f} s  verify {a['verify_s']:5.2f} s  train "
              f"{a['train_s']:6.2f} s  "
              f"step {a['step_s']:6.2f} s  rollout share {a['rollout_share']:.0%}")
    print(f"rollout {report['rollout_speedup']:.2f}x faster, step {report['step_speedup']:.2f}x; wrote "
          f"{args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
