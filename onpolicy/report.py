"""The pipeline's report: `report.json` (keys below), `report.md`, PNGs and a replay page.

report.json:
  name, pipeline, created, machine                       what ran where
  stages.<stage>: recipe, model, attention, train_minutes (wall time of its `onpolicy train` runs),
      pass@1.{validation, heldout, repair}: {value, ci95, n} (greedy, one token per step),
      tokens_per_forward.{one_per_step, fast}: on held-out tasks (fast: eval.fast_threshold),
      heldout_fast_pass@1: {value, ci95}
  ar_comparison: from `onpolicy bench` (batch 1, held-out tasks): ar_tokens_per_s, ar_pass@1,
      model, before; fastest_within_2_points (the model's fastest setting whose pass@1 is at most
      2 points below AR's: setting, tokens_per_s, speed_vs_ar, pass@1, tokens_per_forward; null if
      none), fastest (the fastest setting at any quality), best_pass (the setting with the best pass@1)
  summary: last_stage, last_pass@1 (held-out), ar_pass@1, speed_vs_ar (fastest_within_2_points if
      any, else best_pass), tokens_per_forward_gain (last stage vs first diffusion stage, fast setting)
  plots: file names of the PNGs and replay.html
"""

from __future__ import annotations

import html
import json
import platform
import time
from pathlib import Path

from onpolicy.evaluation import within_tolerance

PASS_SETS = {"validation": "generated:validation", "heldout": "generated:heldout", "repair": "repair:heldout"}


def _stage_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def stage_table(p, evals: dict) -> dict:
    out = {}
    for stage in p.stages:
        ev, run = evals[stage.name], p.output_dir / stage.name
        times = json.loads((run / "pipeline_time.json").read_text())["attempts"] if (run / "pipeline_time.json").is_file() else []
        fast = ev.get("generated:heldout/fast")
        out[stage.name] = {
            "recipe": stage.recipe,
            "model": ev["model"],
            "attention": ev["attention"],
            "train_minutes": round(sum(times) / 60, 2),
            "pass@1": {k: {"value": ev[f"{v}/one_per_step"]["pass@1"], "ci95": ev[f"{v}/one_per_step"]["pass@1_ci95"],
                           "n": ev[f"{v}/one_per_step"]["n"]} for k, v in PASS_SETS.items()},
            "tokens_per_forward": {"one_per_step": ev["generated:heldout/one_per_step"]["tokens_per_forward"],
                                   "fast": fast["tokens_per_forward"] if fast else None},
            "heldout_fast_pass@1": {"value": fast["pass@1"], "ci95": fast["pass@1_ci95"]} if fast else None,
            # the same numbers from the command line (greedy, seed 0):
            "eval_command": f"onpolicy eval {ev['model']} --tasks generated:heldout --limit {p.eval.limit} "
                            f"--max-new-tokens {p.eval.max_new_tokens}",
        }
        if Path(ev["model"]).name == "best" and (picked := run / "best" / "validation.json").is_file():
            out[stage.name]["best_step"] = json.loads(picked.read_text()).get("step", 0)  # 0: the stage's start
    return out


def ar_comparison(bench: dict) -> dict:
    results = bench["results"]
    ar = results["ar"]
    mine = {k: r for k, r in results.items() if r["model"] == "diffusion"}

    def pick(r: dict, name: str) -> dict:
        return {"setting": name, "tokens_per_s": r["tokens_per_s"], "speed_vs_ar": r["speed_vs_ar"], "pass@1": r["pass_at_1"],
                "tokens_per_forward": r["tokens_per_forward"]}

    ok = {k: r for k, r in mine.items() if within_tolerance(r["pass_at_1"], ar["pass_at_1"], 0.02)}
    fastest_ok = max(ok, key=lambda k: ok[k]["tokens_per_s"]) if ok else None
    fastest = max(mine, key=lambda k: mine[k]["tokens_per_s"])
    best = max(mine, key=lambda k: (mine[k]["pass_at_1"], mine[k]["tokens_per_s"]))
    return {"ar_tokens_per_s": ar["tokens_per_s"], "ar_pass@1": ar["pass_at_1"], "model": bench["checkpoint"],
            "before": bench.get("before_checkpoint"), "tasks": bench["tasks"], "n_tasks": bench["n_tasks"],
            "fastest_within_2_points": pick(ok[fastest_ok], fastest_ok) if fastest_ok else None,
            "fastest": pick(mine[fastest], fastest), "best_pass": pick(mine[best], best)}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(p, path: Path) -> None:
    """Training loss per stage (stage 4: reward and pass rate), one panel each."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(p.stages), figsize=(3.2 * len(p.stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], p.stages):
        rows = _stage_metrics(p.output_dir / stage.name)
        loss = [(m["step"], m["train/loss"]) for m in rows if "train/loss" in m]
        if loss:
            ax.plot(*zip(*loss), ".-", color="tab:blue", label="train loss")
            val = [(m["step"], m["val/loss"]) for m in rows if "val/loss" in m]
            if val:
                ax.plot(*zip(*val), "o-", color="tab:orange", label="validation loss")
        else:
            reward = [(m["step"], m["reward"]) for m in rows if "reward" in m]
            if reward:
                ax.plot(*zip(*reward), color="tab:green", label="reward")
                ax.plot(*zip(*[(m["step"], m["rollout/pass_rate"]) for m in rows if "reward" in m]), color="tab:red", label="pass rate")
        ax.set(title=stage.name, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{p.name}: training curves per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stages(p, table: dict, path: Path) -> None:
    """pass@1 (with 95% intervals) and tokens per forward after each stage, side by side."""
    plt = _plt()
    names = list(table)
    x = range(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (key, color) in enumerate((("validation", "tab:blue"), ("heldout", "tab:orange"), ("repair", "tab:green"))):
        vals = [table[n]["pass@1"][key]["value"] for n in names]
        lo = [v - table[n]["pass@1"][key]["ci95"][0] for v, n in zip(vals, names)]
        hi = [table[n]["pass@1"][key]["ci95"][1] - v for v, n in zip(vals, names)]
        left.bar([j + (i - 1) * 0.27 for j in x], vals, 0.27, yerr=[lo, hi], capsize=3, color=color, label=key)
    left.set(xticks=list(x), xticklabels=names, ylabel="pass@1 (one token per step)", title="quality after each stage", ylim=(0, None))
    left.legend(fontsize=8)
    one = [table[n]["tokens_per_forward"]["one_per_step"] for n in names]
    fast = [table[n]["tokens_per_forward"]["fast"] or float("nan") for n in names]
    right.bar([j - 0.2 for j in x], one, 0.4, color="tab:gray", label="one token per step")
    right.bar([j + 0.2 for j in x], fast, 0.4, color="tab:purple", label=f"threshold {p.eval.fast_threshold}")
    right.set(xticks=list(x), xticklabels=names, ylabel="tokens per forward (held-out)", title="parallelism after each stage", ylim=(0, None))
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{p.name}: {table[names[-1]]['pass@1']['heldout']['n']} tasks per set, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_onpolicy(p, path: Path) -> bool:
    """Tokens per forward and pass@1 over the on-policy steps (the stage whose metrics have rewards)."""
    stage = next((s for s in p.stages if any("reward" in m for m in _stage_metrics(p.output_dir / s.name))), None)
    if stage is None:
        return False
    rows = _stage_metrics(p.output_dir / stage.name)
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    roll = [m for m in rows if "reward" in m]
    left.plot([m["step"] for m in roll], [m["rollout/tokens_per_forward"] for m in roll], label="rollouts")
    val = [m for m in rows if "val/fast/tokens_per_forward" in m]
    if val:
        left.plot([m["step"] for m in val], [m["val/fast/tokens_per_forward"] for m in val], "o-", label="validation, fast")
        right.plot([m["step"] for m in val], [m["val/slow/pass@1"] for m in val], "o-", label="validation, one token per step")
        right.plot([m["step"] for m in val], [m["val/fast/pass@1"] for m in val], "s-", label="validation, fast")
    right.plot([m["step"] for m in roll], [m["rollout/pass_rate"] for m in roll], alpha=0.5, label="rollout pass rate")
    left.set(xlabel="step", ylabel="tokens per forward", title=f"{stage.name}: parallelism", ylim=(0, None))
    right.set(xlabel="step", ylabel="pass@1", title=f"{stage.name}: quality", ylim=(0, None))
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def replay_page(p, before: str, after: str, path: Path, threshold: float) -> None:
    """One held-out task decoded by the model before and after a stage, replayable side by side."""
    from onpolicy.data.tasks import encode_prompt, load_task_set
    from onpolicy.loading import load_model
    from onpolicy.pipeline import model_folder
    from onpolicy.sampling import SamplerConfig, generate
    from onpolicy.tokenizer import SpecialTokens
    from onpolicy.visualize import frames, trajectory_html

    task = load_task_set("generated:heldout", 1, 0)[0]
    panes = []
    for name in (before, after):
        model, tokenizer = load_model(str(model_folder(p.output_dir / name)))
        special = SpecialTokens.from_tokenizer(tokenizer)
        ids, _ = encode_prompt(tokenizer, task.prompt, False)
        traj = generate(model, [ids], special, SamplerConfig(max_new_tokens=p.eval.max_new_tokens, threshold=threshold), seeds=[0])
        steps = frames(traj.row(0), tokenizer, special.mask, special.eos)
        title = f"{name}: {len(steps)} steps, {traj.tokens_per_forward:.2f} tokens/forward"
        panes.append(f'<iframe title="{html.escape(name)}" srcdoc="{html.escape(trajectory_html(task.prompt, steps, title))}"></iframe>')
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(p.name)}: before and after</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 1em; }} .row {{ display: flex; gap: 1em; }}
iframe {{ flex: 1; height: 85vh; border: 1px solid #ccc; }}</style></head><body>
<h2>{html.escape(task.task_id)}: {html.escape(before)} (left) and {html.escape(after)} (right), threshold {threshold}</h2>
<div class="row">{''.join(panes)}</div></body></html>
""")


def _pct(v: dict) -> str:
    return f"{v['value']:.1%} [{v['ci95'][0]:.1%}, {v['ci95'][1]:.1%}]"


def write_report(p, evals: dict, bench: dict, choice: dict | None = None) -> dict:
    import torch

    table = stage_table(p, evals)
    comparison = ar_comparison(bench)
    diffusion = [n for n in table if table[n]["attention"] != "causal"]
    last = p.stages[-1].name
    headline = comparison["fastest_within_2_points"] or comparison["best_pass"]
    first_fast = table[diffusion[0]]["tokens_per_forward"]["fast"] if diffusion else None
    summary = {"last_stage": last, "last_pass@1": table[last]["pass@1"]["heldout"]["value"], "ar_pass@1": comparison["ar_pass@1"],
               "speed_vs_ar": headline["speed_vs_ar"], "speed_setting": headline["setting"],
               "within_2_points_of_ar": comparison["fastest_within_2_points"] is not None,
               "tokens_per_forward_gain": (table[last]["tokens_per_forward"]["fast"] / first_fast
                                           if first_fast and table[last]["tokens_per_forward"]["fast"] else None)}
    plots = ["losses.png", "stages.png", "frontier.png"]
    plot_losses(p, p.output_dir / "losses.png")
    plot_stages(p, table, p.output_dir / "stages.png")
    if plot_onpolicy(p, p.output_dir / "onpolicy.png"):
        plots.append("onpolicy.png")
    onpolicy_stage = next((s for s in p.stages if (p.output_dir / s.name / "best").is_dir()), None)
    if onpolicy_stage is not None and onpolicy_stage.init_from:
        replay_page(p, onpolicy_stage.init_from, onpolicy_stage.name, p.output_dir / "replay.html", p.eval.fast_threshold)
        plots.append("replay.html")
    report = {"name": p.name, "pipeline": p.source, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
              "stages": table, "ar_comparison": comparison, "summary": summary, "plots": plots}
    (p.output_dir / "report.json").write_text(json.dumps(report, indent=1))
    lines = [f"# {p.name}: the method end to end", "",
             f"`onpolicy pipeline {p.source}` on {report['machine']['platform']} ({report['machine']['threads']} threads), "
             f"{report['created']}.", "",
             f"**Held-out pass@1 after {last}: {_pct(table[last]['pass@1']['heldout'])}** (AR baseline in the bench: "
             f"{comparison['ar_pass@1']:.1%}). Against the AR baseline at batch 1: **{headline['speed_vs_ar']:.2f}x its tokens/s** "
             f"at `{headline['setting']}` (pass@1 {headline['pass@1']:.1%}"
             + ("" if summary["within_2_points_of_ar"] else "; no setting stays within 2 points of AR's pass@1") + ").", "",
             "| stage | train min | validation pass@1 | held-out pass@1 | repair pass@1 | tok/fwd (1/step) | "
             f"tok/fwd (p>={p.eval.fast_threshold}) | held-out pass@1 (p>={p.eval.fast_threshold}) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        fast = row["heldout_fast_pass@1"]
        lines.append(f"| {name} | {row['train_minutes']:.1f} | {_pct(row['pass@1']['validation'])} | {_pct(row['pass@1']['heldout'])} | "
                     f"{_pct(row['pass@1']['repair'])} | {row['tokens_per_forward']['one_per_step']:.2f} | "
                     + (f"{row['tokens_per_forward']['fast']:.2f} | {_pct(fast)} |" if fast else "- | - |"))
    for name, row in table.items():
        if "best_step" in row:
            lines += ["", f"{name} hands on `best/`, its checkpoint by the stage's rule (both pass@1 within the tolerance of its "
                      "start's, then the most tokens per forward): "
                      + (f"step {row['best_step']}." if row["best_step"] else
                         "**its starting model** (no validation after step 0 met the rule), so this row repeats the stage it started from.")]
    lines += ["", f"Each row's numbers come back from `onpolicy eval MODEL --tasks SET --limit {p.eval.limit} "
              f"--max-new-tokens {p.eval.max_new_tokens}` (add `--threshold {p.eval.fast_threshold}` for the fast columns); "
              "the AR comparison is `bench.json`, written by `onpolicy bench`.", "",
              "![pass@1 and tokens per forward after each stage](stages.png)", "",
              "![speed-quality frontier against the AR baseline](frontier.png)", "",
              "![training curves per stage](losses.png)", ""]
    if "onpolicy.png" in plots:
        lines += ["![tokens per forward and pass@1 over the on-policy steps](onpolicy.png)", ""]
    if "replay.html" in plots:
        lines += ["[One held-out task's denoising before and after stage 4, side by side](replay.html)", ""]
    (p.output_dir / "report.md").write_text("\n".join(lines))
    return report
