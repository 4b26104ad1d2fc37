"""Stage 4's ablation at equal compute: which part of the loss and reward moves the frontier.

    python benchmarks/stage4_ablation.py --init runs/tiny-tasks-from-ar-b4/final --steps 12 \\
        --out benchmarks/results/stage4_history/stage4_ablation.json --png
        benchmarks/results/stage4_history/stage4_ablation.png

Every arm is `onpolicy train recipes/tiny/stage4_onpolicy.yaml` (as a user runs it) from the same
starting model, with the same prompts (same seed), group size, completion length, learning rate and
number of steps; only the switches below differ:

    accuracy only        reward.alpha=0, loss.surrogate=none       (the verifier's score alone, plain
    GRPO-style) reward only          loss.surrogate=none                       (multiplicative speed reward,
    no surrogate) progress             loss.surrogate=progress                   (the progress-cost surrogate
    alone) jump                 loss.surrogate=jump                       (verified jump distillation alone:
    the recipe) both                 loss.surrogate=both                       (the combination)
    additive             reward.form=additive, loss.surrogate=jump (additive instead of multiplicative reward)

The controls (what stage 4 is: on-policy learning or self-distillation), from the main job's stage-3 model:

    python benchmarks/stage4_ablation.py --init runs/pipeline-tiny/stage3/final --recipe
    recipes/tiny/stage4_onpolicy_b8.yaml \
        --steps 120 --every 40 --arms "control recipe" "control no policy term" "control SFT only" "control
        sampled, 2 updates"

    control recipe              the main job's stage 4 as it is
    control no policy term      loss.pg_weight=0: the surrogates, the anchor and the distillation only
    control SFT only            the reference solutions alone (the anchor; no rollout is trained on):
    continued
                                supervised training on the same train tasks
    control sampled, 2 updates  sampled rollouts (T 0.8) and two optimizer steps per batch, so the ratio
    leaves
                                1 and the clip binds (twice the optimizer work: its seconds are reported)

With `--ar AR_FOLDER` each arm's final model is then judged as the main job judges its own: on the
300 validation tasks (generated:heldout:seed=0:skip=300) at one token per step and at each threshold of
`--choose-from`, the fastest setting within `--tolerance` of the AR twin's validation pass@1 is chosen;
then the 300 test tasks (generated:heldout, the main job's clean test slice) are decoded at one token
per step, at 0.9, 0.7, 0.5 and at the chosen setting: the frontier, with 95% intervals, in the JSON
(`frontier` per arm) and in the PNG's third panel. pass@1 and tokens per forward are counts.

Each arm validates on the same validation tasks at one token per step and at the fast threshold
every `--every` steps (the trainer's own validation, logged in its metrics.jsonl). The JSON holds
every arm's curve, its last validation, its seconds of training; the PNG draws tokens per forward
(fast) and pass@1 (both decodings) over the steps, one colour per arm. `--set KEY=VALUE` adds
overrides to every arm (e.g. a block size). Nothing else should run on the machine meanwhile if the
seconds matter; pass@1 and tokens per forward are counts and do not depend on load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from onpolicy.metrics import step_seconds

ROOT = Path(__file__).resolve().parent.parent

ARMS = {
    "accuracy only": ["reward.alpha=0", "loss.surrogate=none"],
    "reward only": ["loss.surrogate=none"],
    "progress": ["loss.surrogate=progress"],
    "jump": ["loss.surrogate=jump"],
    "both": ["loss.surrogate=both"],
    "additive": ["reward.form=additive", "loss.surrogate=jump"],
    # the controls: what is on-policy learning and what is self-distillation (run with the
    # b8 recipe, --arms control*)
    "control recipe": [],
    "control no policy term": ["loss.pg_weight=0"],
    "control SFT only": ["loss.pg_weight=0", "loss.distill_passed=0", "loss.distill_failed=0",
                         "loss.buffer_size=0", "loss.anchor=1"],
    "control sampled, 2 updates": ["rollout.sampler.temperature=0.8", "loss.updates_per_batch=2"],
}


def folder_name(arm: str) -> str:
    return arm.replace(" ", "-")


def run_arm(arm: str, args) -> Path:
    out = args.runs / folder_name(arm)
    if (out / "summary.json").is_file():  # finished earlier: reuse (delete the folder to rerun)
        return out
    cmd = ["train", args.recipe, f"model.init_from={args.init}", f"train.max_steps={args.steps}",
           f"train.warmup_steps={max(1, args.steps // 10)}", f"validation.every={args.every}",
           f"validation.n_tasks={args.val_tasks}", f"train.save_every={args.steps}",
           f"logging.output_dir={out}", "logging.progress=false", *ARMS[arm], *args.set]
    print(f"[ablation] {arm}: onpolicy {' '.join(cmd)}", flush=True)
    subprocess.run([sys.executable, "-m", "onpolicy.cli", *cmd], cwd=ROOT, check=True)
    return out


def read_arm(arm: str, out: Path) -> dict:
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [{"step": m["step"], **{k[4:]: v for k, v in m.items() if k.startswith("val/")}} for m in metrics
           if "val/slow/pass@1" in m]
    steps = [m for m in metrics if "time/rollout" in m]
    seconds = sum(step_seconds(m) for m in steps)
    return {"arm": arm, "overrides": ARMS[arm], "folder": str(out), "validation": val, "last": val[-1],
            "train_seconds": seconds, "rollout_pass_rate": [m["rollout/pass_rate"] for m in steps],
            "rollout_tokens_per_forward": [m["rollout/tokens_per_forward"] for m in steps]}


def frontier(folder: Path, ar: dict, args) -> dict:
    """The main job's judgement of one final model: its setting chosen on validation, its frontier on test."""
    from onpolicy.evaluation import evaluate_checkpoint, fastest_within
    from onpolicy.loading import load_model
    from onpolicy.sampling import SamplerConfig
    from verifiers import PythonTestVerifier

    model, tokenizer = load_model(str(folder))
    block = model.config.block_size

    def run(tasks, threshold) -> dict:
        cfg = SamplerConfig(max_new_tokens=96, block_size=block, threshold=threshold)
        r = evaluate_checkpoint(model, tokenizer, tasks, cfg, 1, verifier, 16, 0)
        return {"threshold": threshold, "pass@1": r["pass@1"], "pass@1_ci95": r["pass@1_ci95"],
                "tokens_per_forward": r["tokens_per_forward"]}

    with PythonTestVerifier() as verifier:
        val = [run(ar["validation_tasks"], t) for t in [None, *args.choose_from]]
        best = fastest_within(val, ar["validation"]["pass@1"], args.tolerance)
        chosen = best["threshold"] if best else None
        test = [run(ar["test_tasks"], t) for t in dict.fromkeys([None, 0.9, 0.7, 0.5, chosen])]
    return {"validation": val, "chosen": chosen, "chosen_on_validation": best is not None, "test": test,
            "test_at_chosen": next(r for r in test if r["threshold"] == chosen)}


def ar_reference(args) -> dict:
    """The AR twin's pass@1 on the validation and test tasks (one token per forward, greedy)."""
    from onpolicy.data.tasks import load_task_set
    from onpolicy.evaluation import evaluate_checkpoint
    from onpolicy.loading import load_model
    from onpolicy.sampling import SamplerConfig
    from verifiers import PythonTestVerifier

    val_tasks, test_tasks = load_task_set(args.validation, args.judge_tasks,
                                          0), load_task_set(args.test, args.judge_tasks, 0)
    model, tokenizer = load_model(str(args.ar))
    with PythonTestVerifier() as verifier:
        out = {name: evaluate_checkpoint(model, tokenizer, tasks, SamplerConfig(max_new_tokens=96), 1,
                                         verifier, 16, 0)
               for name, tasks in (("validation", val_tasks), ("test", test_tasks))}
    return {"folder": str(args.ar), "n": len(test_tasks),
            **{k: {"pass@1": v["pass@1"], "pass@1_ci95": v["pass@1_ci95"]} for k, v in out.items()},
            "validation_tasks": val_tasks, "test_tasks": test_tasks}


def plot(arms: list[dict], path: Path, n_tasks: int, ar: dict | None = None,
         start: dict | None = None) -> None:
    """Tokens per forward and pass@1 over the steps, each arm a colour; pass@1 at one token per step with
    its 95% Wilson interval over the `n_tasks` validation tasks (the arms differ by less than it)."""
    import matplotlib

    from onpolicy.evaluation import wilson_interval

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_test = ar is not None and all("frontier" in a for a in arms)
    fig, axes = plt.subplots(1, 3 if with_test else 2, figsize=(19.5 if with_test else 13, 6))
    a1, a2 = axes[:2]
    for i, a in enumerate(arms):
        colour = f"C{i}"
        steps = [v["step"] for v in a["validation"]]
        a1.plot(steps, [v["fast/tokens_per_forward"] for v in a["validation"]], "o-", color=colour,
                label=a["arm"])
        slow = [v["slow/pass@1"] for v in a["validation"]]
        ci = [wilson_interval(round(p * n_tasks), n_tasks) for p in slow]
        shift = [x + 0.15 * (i - len(arms) / 2) for x in steps]  # side by side, so the bars stay readable
        a2.errorbar(shift, slow, yerr=[[p - lo for p, (lo, _) in zip(slow, ci)],
                                       [hi - p for p, (_, hi) in zip(slow, ci)]],
                    fmt="s-", color=colour, capsize=2, label=f"{a['arm']}, 1 token/step (95% CI)")
        a2.plot(steps, [v["fast/pass@1"] for v in a["validation"]], "^--", color=colour, alpha=0.6,
                label=f"{a['arm']}, fast")
    a1.set(xlabel="stage-4 step", ylabel="tokens per forward (fast setting, validation)",
           title="speed over stage-4 steps")
    a2.set(xlabel="stage-4 step", ylabel="validation pass@1",
           title="quality over stage-4 steps (solid: 1 token/step; dashed: fast)")
    a1.legend(fontsize=8)
    a2.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    # the frontier on the test tasks: pass@1 against tokens per forward, the chosen setting ringed
    if with_test:
        a3 = axes[2]
        for i, a in enumerate(arms):
            pts = sorted(a["frontier"]["test"], key=lambda r: r["tokens_per_forward"])
            lo = [r["pass@1"] - r["pass@1_ci95"][0] for r in pts]
            hi = [r["pass@1_ci95"][1] - r["pass@1"] for r in pts]
            a3.errorbar([r["tokens_per_forward"] for r in pts], [r["pass@1"] for r in pts], yerr=[lo, hi],
                        fmt="o-", color=f"C{i}", capsize=2, label=a["arm"])
            c = a["frontier"]["test_at_chosen"]
            a3.plot([c["tokens_per_forward"]], [c["pass@1"]], "o", ms=14, mfc="none", color=f"C{i}")
        if start is not None:
            pts = sorted(start["test"], key=lambda r: r["tokens_per_forward"])
            a3.plot([r["tokens_per_forward"] for r in pts], [r["pass@1"] for r in pts], "x:", color="gray",
                    label="start (stage 3)")
        a3.axhline(ar["test"]["pass@1"], color="black", ls="--",
                   label=f"AR twin ({ar['test']['pass@1']:.3f})")
        a3.set(xlabel="tokens per forward (test)", ylabel=f"test pass@1 ({ar['n']} tasks, 95% CI)",
               title="frontier on the test slice (ringed: chosen on validation)")
        a3.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", help="the starting model (every arm starts from it); required unless --replot")
    p.add_argument("--recipe", default="recipes/tiny/stage4_onpolicy.yaml")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=6)
    p.add_argument("--val-tasks", type=int, default=100)
    p.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides for every arm")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "stage4-ablation")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stage4_ablation.json")
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--replot", type=Path, default=None,
                   help="only redraw --png from this report JSON (no training)")
    p.add_argument("--ar", type=Path, default=None,
                   help="the AR twin: judge every arm's final model as the main job does")
    p.add_argument("--validation", default="generated:heldout:seed=0:skip=300")
    p.add_argument("--test", default="generated:heldout")
    p.add_argument("--choose-from", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--judge-tasks", type=int, default=300,
                   help="validation and test tasks of the judgement (--ar)")
    args = p.parse_args()
    if args.replot:
        report = json.loads(args.replot.read_text())
        plot(report["arms"], args.png, report["validation_tasks"], report.get("ar"),
             report.get("start_frontier"))
        return 0
    if not args.init:
        p.error("--init FOLDER is required (the starting model every arm trains from)")
    arms = [read_arm(arm, run_arm(arm, args)) for arm in args.arms]
    start = arms[0]["validation"][0]
    ar = None
    if args.ar:
        ar = ar_reference(args)
        for a in arms:
            a["frontier"] = frontier(Path(a["folder"]) / "final", ar, args)
            print(f"[ablation] {a['arm']}: chosen {a['frontier']['chosen']}, test "
                  f"{a['frontier']['test_at_chosen']}", flush=True)
        start_frontier = frontier(Path(args.init), ar, args)  # the model every arm starts from, judged alike
        ar = {k: v for k, v in ar.items() if not k.endswith("_tasks")}
    report = {"init": args.init, "recipe": args.recipe, "steps": args.steps,
              "validation_tasks": args.val_tasks, "extra": args.set, "start": start, "ar": ar, "arms": arms}
    if args.ar:
        report["start_frontier"] = start_frontier
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{'arm':15s} {'slow pass@1':>11s} {'fast pass@1':>11s} {'fast tok/fwd':>12s} {'train s':>8s}")
    print(f"{'start':15s} {start['slow/pass@1']:11.3f} {start['fast/pass@1']:11.3f} "
          f"{start['fast/tokens_per_forward']:12.2f}")
    for a in arms:
        last = a["last"]
        print(f"{a['arm']:15s} {last['slow/pass@1']:11.3f} {last['fast/pass@1']:11.3f} "
              f"{last['fast/tokens_per_forward']:12.2f} "
              f"{a['train_seconds']:8.0f}")
    if args.png:
        plot(arms, args.png, args.val_tasks, ar, report.get("start_frontier"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
