"""Stage 4's claim, frontier to frontier: tokens per forward at the same quality, before and after.

    python benchmarks/stage4_frontier.py --model start runs/tiny-tasks-from-ar-b4 --model stage4
    runs/tiny-stage4/best \\
        --run runs/tiny-stage4 --limit 300 --out benchmarks/results/stage4_history/stage4_frontier.json --png
        benchmarks/results/stage4_history/stage4_frontier.png

Every model is decoded through `onpolicy eval`'s path (`evaluate_checkpoint`: the one sampler, the
sandbox) on the same held-out generated tasks, greedy, at one token per step, at several commit
thresholds and at fixed steps per block. The bar is the first model's pass@1 at one token per step;
for each model, its fastest setting whose pass@1 stays within `--tolerance` of the bar is reported,
and the ratio of tokens per forward (generated tokens before EOS / all the row's forwards, prompt
and cache writes included) to the first model's. 95% Wilson intervals on every pass@1. With `--run`,
a PNG of tokens per forward and pass@1 over the stage-4 steps is drawn from its metrics.jsonl.
`at_first_speeds` reads each frontier at the first model's speeds as well (pass@1 interpolated
linearly in tokens per forward between two measured settings; none outside the measured range):
quality at equal speed, the other side of the same comparison.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def settings(block: int, thresholds: list[float], steps: list[int]):
    from onpolicy.sampling import SamplerConfig

    out = [("one token per step", SamplerConfig(max_new_tokens=96))]
    out += [(f"threshold {t}", SamplerConfig(max_new_tokens=96, threshold=t)) for t in thresholds]
    out += [(f"{k} steps per block", SamplerConfig(max_new_tokens=96, steps_per_block=k)) for k in steps
            if k < block]
    return out


def fastest_within(rows: list[dict], name: str, bar: float, tolerance: float) -> dict | None:
    """Model `name`'s fastest setting (most tokens per forward) whose pass@1 is within `tolerance` of the
    bar."""
    from onpolicy import evaluation

    return evaluation.fastest_within([r for r in rows if r["model"] == name], bar, tolerance)


def pass_at(rows: list[dict], speed: float) -> float | None:
    """A frontier's pass@1 at `speed` tokens per forward; None outside the measured range. The frontier is
    the upper envelope of the settings: one that a setting at least as fast matches or beats on pass@1 is
    not on it (a fixed steps-per-block setting just slower than a better threshold would otherwise pull the
    line down between them). Linear between two frontier settings; below the slowest one, its pass@1 (a
    faster setting gives it)."""
    measured = [r["tokens_per_forward"] for r in rows]
    if not measured or not min(measured) <= speed <= max(measured):
        return None
    points, best = [], -1.0
    for x, y in sorted(((r["tokens_per_forward"], r["pass@1"]) for r in rows), key=lambda p: (-p[0], -p[1])):
        if y > best:  # fastest first: on the frontier only if it beats every faster setting
            points.append((x, y))
            best = y
    points.reverse()  # slowest first; pass@1 falls along it
    if speed <= points[0][0]:
        return points[0][1]
    a, b = next((a, b) for a, b in zip(points, points[1:]) if a[0] <= speed <= b[0])
    return a[1] + (b[1] - a[1]) * (speed - a[0]) / (b[0] - a[0])


def earlier_rows(reports: list[str], tasks: str, n_tasks: int) -> dict[tuple[str, str], tuple[str, dict]]:
    """(model folder, setting) -> (report, row) from earlier reports, each checked to have decoded the same
    tasks; where two hold the same setting of a folder, the first named gives it."""
    old = {}
    for report in reports:
        earlier = json.loads(Path(report).read_text())
        if (earlier["tasks"], earlier["n_tasks"]) != (tasks, n_tasks):
            raise SystemExit(f"--reuse {report}: it evaluated {earlier['n_tasks']} {earlier['tasks']} tasks, "
                             f"not {n_tasks} {tasks}")
        for r in earlier["rows"]:
            old.setdefault((r["folder"], r["setting"]), (report, r))
    return old


def main() -> int:
    from onpolicy.data.tasks import load_task_set
    from onpolicy.evaluation import evaluate_checkpoint
    from onpolicy.loading import load_model
    from verifiers import PythonTestVerifier

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs=2, action="append", metavar=("NAME", "FOLDER"), required=True)
    p.add_argument("--tasks", default="generated:heldout")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3, 0.1])
    p.add_argument("--steps", type=int, nargs="*", default=[2, 1])
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--run", default=None, help="a stage-4 run folder: plot its training curves")
    p.add_argument("--out", default="benchmarks/results/stage4_history/stage4_frontier.json")
    p.add_argument("--png", default=None)
    p.add_argument("--reuse", nargs="+", default=[], metavar="JSON",
                   help="earlier reports (same tasks and limit): a model folder's "
                   "settings found there are taken (under this run's name for it) instead of decoding again "
                   "(greedy decoding is "
                   "deterministic); the settings they lack are decoded")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = load_task_set(args.tasks, args.limit)
    rows, old = [], earlier_rows(args.reuse, args.tasks, len(tasks))
    with PythonTestVerifier() as verifier:
        for name, folder in args.model:
            model, tokenizer = load_model(folder)
            block = getattr(model.config, "block_size", 1)
            for label, cfg in settings(block, args.thresholds, args.steps):
                if (folder, label) in old:
                    report, r = old[folder, label]
                    rows.append({**r, "model": name})
                    print(f"{name:10s} {label:22s} from {report}", flush=True)
                    continue
                r = evaluate_checkpoint(model, tokenizer, tasks, cfg, samples=1, verifier=verifier,
                                        batch_size=32)
                rows.append({"model": name, "folder": folder, "setting": label, "pass@1": r["pass@1"],
                             "pass@1_ci95": r["pass@1_ci95"], "tokens_per_forward": r["tokens_per_forward"],
                             "status_counts": r["status_counts"]})
                print(f"{name:10s} {label:22s} pass@1 {r['pass@1']:.3f} [{r['pass@1_ci95'][0]:.3f}, "
                      f"{r['pass@1_ci95'][1]:.3f}] "
                      f"tokens/forward {r['tokens_per_forward']:.2f}", flush=True)
    first = args.model[0][0]
    bar = next(r["pass@1"] for r in rows if r["model"] == first and r["setting"] == "one token per step")
    fastest = {name: fastest_within(rows, name, bar, args.tolerance) for name, _ in args.model}
    base = fastest[first]["tokens_per_forward"] if fastest[first] else None
    summary = {name: None if f is None
               else {**f, "speedup_vs_first": f["tokens_per_forward"] / base if base else None}
               for name, f in fastest.items()}
    # the measured speeds themselves, not rounded ones: 0.894 rounded to 0.89 falls below the slowest setting
    speeds = sorted({r["tokens_per_forward"] for r in rows if r["model"] == first})
    at_speeds = {name: {f"{x:.2f}": pass_at([r for r in rows if r["model"] == name], x) for x in speeds}
                 for name, _ in args.model}
    report = {"tasks": args.tasks, "n_tasks": len(tasks), "bar": bar, "tolerance": args.tolerance,
              "fastest_within_bar": summary, "at_first_speeds": at_speeds, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"bar (pass@1 of {first} at one token per step): {bar:.3f}")
    for name, f in summary.items():
        print(f"{name:10s} fastest within {args.tolerance:.2f}: " + ("none" if f is None else
              f"{f['setting']}, pass@1 {f['pass@1']:.3f}, {f['tokens_per_forward']:.2f} tokens/forward "
              f"(x{f['speedup_vs_first'] or 0:.2f})"))
    print(f"pass@1 at {first}'s tokens per forward: " + "  ".join(f"{x:.2f}" for x in speeds))
    for name, row in at_speeds.items():
        print(f"{name:10s} " + "  ".join("  -  " if v is None else f"{v:.3f}" for v in row.values()))
    if args.png:
        plot(rows, bar, args.tolerance, Path(args.png), args.run)
    return 0


def plot(rows: list[dict], bar: float, tolerance: float, path: Path, run: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if run else 1, figsize=(13 if run else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    names = list(dict.fromkeys(r["model"] for r in rows))
    colors = plt.cm.tab20.colors if len(names) > 10 else plt.cm.tab10.colors  # no two models share a colour
    for i, name in enumerate(names):
        # two curves per model, one colour: the threshold sweep (one token per step is its slow end) solid,
        # fixed steps per block dotted; one line through both would zig-zag where their speeds interleave
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["tokens_per_forward"])
        fixed = [r for r in mine if r["setting"].endswith("steps per block")]
        for part, style, label in (([r for r in mine if r not in fixed], "-", name), (fixed, ":", None)):
            if not part:
                continue
            x = [r["tokens_per_forward"] for r in part]
            y = [r["pass@1"] for r in part]
            err = [[r["pass@1"] - r["pass@1_ci95"][0] for r in part],
                   [r["pass@1_ci95"][1] - r["pass@1"] for r in part]]
            ax.errorbar(x, y, yerr=err, marker="os^DvpX*"[i % 8], ls=style, color=colors[i % len(colors)],
                        capsize=3, label=label, mfc="none" if style == ":" else None)
    ax.axhspan(bar - tolerance, bar + 1, color="green", alpha=0.06,
               label=f"within {tolerance:.2f} of the bar")
    ax.axhline(bar, color="green", lw=0.8, ls="--")
    ax.set(xlabel="tokens per forward (held-out, greedy)", ylabel="pass@1 (95% interval)",
           title="speed-quality frontier (solid: thresholds; dotted, open: fixed steps per block)",
           ylim=(0, max(r["pass@1_ci95"][1] for r in rows) + 0.05))
    ax.legend(loc="upper right", fontsize=8)
    if run:
        metrics = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        val = [m for m in metrics if "val/fast/pass@1" in m]
        ax2 = axes[0][1]
        ax2.plot([m["step"] for m in val], [m["val/fast/tokens_per_forward"] for m in val], "o-",
                 color="tab:blue", label="tokens per forward (fast)")
        steps = [m for m in metrics if "rollout/tokens_per_forward" in m]
        ax2.plot([m["step"] for m in steps], [m["rollout/tokens_per_forward"] for m in steps],
                 color="tab:blue", alpha=0.3, label="tokens per forward (rollouts)")
        ax2.set(xlabel="stage-4 step", ylabel="tokens per forward", title="over the on-policy steps")
        ax3 = ax2.twinx()
        ax3.plot([m["step"] for m in val], [m["val/slow/pass@1"] for m in val], "s--", color="tab:red",
                 label="pass@1, 1 token/step")
        ax3.plot([m["step"] for m in val], [m["val/fast/pass@1"] for m in val], "^--", color="tab:orange",
                 label="pass@1, fast")
        top = max([m["val/slow/pass@1"] for m in val] + [m["val/fast/pass@1"] for m in val], default=0.9)
        ax3.set(ylabel="validation pass@1", ylim=(0, min(1.0, top + 0.1)))
        lines = ax2.get_legend_handles_labels()
        more = ax3.get_legend_handles_labels()
        ax2.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
