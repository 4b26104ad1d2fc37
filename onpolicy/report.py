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

from onpolicy.evaluation import fastest_within, within_tolerance

PASS_SETS = {"validation": "generated:validation", "heldout": "generated:heldout", "repair": "repair:heldout"}


def _stage_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def stage_table(p, evals: dict) -> dict:
    out = {}
    for stage in p.stages:
        ev, run = evals[stage.name], p.output_dir / stage.name
        timing = run / "pipeline_time.json"
        times = json.loads(timing.read_text())["attempts"] if timing.is_file() else []
        fast = ev.get("generated:heldout/fast")
        out[stage.name] = {
            "recipe": stage.recipe,
            "model": ev["model"],
            "attention": ev["attention"],
            "train_minutes": round(sum(times) / 60, 2),
            "pass@1": {k: {"value": ev[f"{v}/one_per_step"]["pass@1"],
                           "ci95": ev[f"{v}/one_per_step"]["pass@1_ci95"], "n": ev[f"{v}/one_per_step"]["n"]}
                       for k, v in PASS_SETS.items()},
            "tokens_per_forward": {"one_per_step": ev["generated:heldout/one_per_step"]["tokens_per_forward"],
                                   "fast": fast["tokens_per_forward"] if fast else None},
            "heldout_fast_pass@1": {"value": fast["pass@1"], "ci95": fast["pass@1_ci95"]} if fast else None,
            # the same numbers from the command line (greedy, seed 0):
            "eval_command": f"onpolicy eval {ev['model']} --tasks generated:heldout --limit {p.eval.limit} "
                            f"--max-new-tokens {p.eval.max_new_tokens}",
        }
        if Path(ev["model"]).name == "best" and (picked := run / "best" / "validation.json").is_file():
            # 0: the stage's start
            out[stage.name]["best_step"] = json.loads(picked.read_text()).get("step", 0)
    return out


def ar_comparison(bench: dict) -> dict:
    results = bench["results"]
    ar = results["ar"]
    mine = {k: r for k, r in results.items() if r["model"] == "diffusion"}

    def pick(r: dict, name: str) -> dict:
        return {"setting": name, "tokens_per_s": r["tokens_per_s"], "speed_vs_ar": r["speed_vs_ar"],
                "pass@1": r["pass_at_1"], "tokens_per_forward": r["tokens_per_forward"]}

    rows = [{"name": k, "pass@1": r["pass_at_1"], "tokens_per_s": r["tokens_per_s"]} for k, r in mine.items()]
    ok = fastest_within(rows, ar["pass_at_1"], 0.02, speed="tokens_per_s")
    fastest = max(mine, key=lambda k: mine[k]["tokens_per_s"])
    best = max(mine, key=lambda k: (mine[k]["pass_at_1"], mine[k]["tokens_per_s"]))
    return {"ar_tokens_per_s": ar["tokens_per_s"], "ar_pass@1": ar["pass_at_1"], "model": bench["checkpoint"],
            "before": bench.get("before_checkpoint"), "tasks": bench["tasks"], "n_tasks": bench["n_tasks"],
            "fastest_within_2_points": pick(mine[ok["name"]], ok["name"]) if ok else None,
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
                ax.plot(*zip(*[(m["step"], m["rollout/pass_rate"]) for m in rows if "reward" in m]),
                        color="tab:red", label="pass rate")
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
    for i, (key, color) in enumerate((("validation", "tab:blue"), ("heldout", "tab:orange"),
                                      ("repair", "tab:green"))):
        vals = [table[n]["pass@1"][key]["value"] for n in names]
        lo = [v - table[n]["pass@1"][key]["ci95"][0] for v, n in zip(vals, names)]
        hi = [table[n]["pass@1"][key]["ci95"][1] - v for v, n in zip(vals, names)]
        left.bar([j + (i - 1) * 0.27 for j in x], vals, 0.27, yerr=[lo, hi], capsize=3, color=color,
                 label=key)
    left.set(xticks=list(x), xticklabels=names, ylabel="pass@1 (one token per step)",
             title="quality after each stage", ylim=(0, None))
    left.legend(fontsize=8)
    one = [table[n]["tokens_per_forward"]["one_per_step"] for n in names]
    fast = [table[n]["tokens_per_forward"]["fast"] or float("nan") for n in names]
    right.bar([j - 0.2 for j in x], one, 0.4, color="tab:gray", label="one token per step")
    right.bar([j + 0.2 for j in x], fast, 0.4, color="tab:purple", label=f"threshold {p.eval.fast_threshold}")
    right.set(xticks=list(x), xticklabels=names, ylabel="tokens per forward (held-out)",
              title="parallelism after each stage", ylim=(0, None))
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{p.name}: {table[names[-1]]['pass@1']['heldout']['n']} tasks per set, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_onpolicy(p, path: Path) -> bool:
    """Tokens per forward and pass@1 over the on-policy steps (the stage whose metrics have rewards)."""
    stage = next((s for s in p.stages if any("reward" in m for m in _stage_metrics(p.output_dir / s.name))),
                 None)
    if stage is None:
        return False
    rows = _stage_metrics(p.output_dir / stage.name)
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    roll = [m for m in rows if "reward" in m]
    left.plot([m["step"] for m in roll], [m["rollout/tokens_per_forward"] for m in roll], label="rollouts")
    val = [m for m in rows if "val/fast/tokens_per_forward" in m]
    if val:
        left.plot([m["step"] for m in val], [m["val/fast/tokens_per_forward"] for m in val], "o-",
                  label="validation, fast")
        right.plot([m["step"] for m in val], [m["val/slow/pass@1"] for m in val], "o-",
                   label="validation, one token per step")
        right.plot([m["step"] for m in val], [m["val/fast/pass@1"] for m in val], "s-",
                   label="validation, fast")
    right.plot([m["step"] for m in roll], [m["rollout/pass_rate"] for m in roll], alpha=0.5,
               label="rollout pass rate")
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
    """One test task decoded by the model before and after a stage, side by side, each pane opening on
    its finished program and its verdict. The task: the first of the test slice that the model after
    the stage passes at `threshold` (the first task if it passes none), a rule stated on the page."""
    from onpolicy.data.tasks import completion_text, encode_prompt, load_task_set
    from onpolicy.loading import load_model
    from onpolicy.sampling import SamplerConfig, generate
    from onpolicy.tokenizer import SpecialTokens
    from onpolicy.visualize import frames, trajectory_html
    from verifiers import PythonTestVerifier

    tasks = load_task_set(p.bench.tasks, min(p.bench.limit, 50), 0)
    cfg = SamplerConfig(max_new_tokens=p.eval.max_new_tokens, threshold=threshold)
    decoded, chosen = {}, 0
    with PythonTestVerifier() as verifier:
        for name in (after, before):
            model, tokenizer = load_model(str(p.hand_on(name)))
            special = SpecialTokens.from_tokenizer(tokenizer)
            decoded[name] = []
            for i, task in enumerate(tasks):
                if name == before and i != chosen:
                    decoded[name].append(None)
                    continue
                ids, held_back = encode_prompt(tokenizer, task.prompt, False)
                traj = generate(model, [ids], special, cfg, seeds=[0])
                completion = completion_text(tokenizer, traj.row(0).tokens, held_back)
                passed = verifier.verify([task], [completion])[0].passed
                decoded[name].append((traj, passed, special, tokenizer))
                if name == after and passed:
                    break
            if name == after:
                chosen = next((i for i, d in enumerate(decoded[after]) if d and d[1]), 0)
    task, panes = tasks[chosen], []
    for name in (before, after):
        traj, passed, special, tokenizer = decoded[name][chosen]
        steps = frames(traj.row(0), tokenizer, special.mask, special.eos)
        title = f"{name}: {len(steps)} steps, {traj.tokens_per_forward:.2f} tokens/forward"
        verdict = "passed its tests" if passed else "failed its tests"
        page = trajectory_html(task.prompt, steps, title, verdict)
        panes.append(f'<iframe title="{html.escape(name)}" srcdoc="{html.escape(page)}"></iframe>')
    rule = (f"the first of the test tasks ({p.bench.tasks}) that {after} passes at threshold {threshold}"
            if decoded[after][chosen][1]
            else f"the first test task ({after} passes none of the first {len(tasks)})")
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>{html.escape(p.name)}: before and after</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 1em; }} .row {{ display: flex; gap: 1em; }}
iframe {{ flex: 1; height: 85vh; border: 1px solid #ccc; }}</style></head><body>
<h2>{html.escape(task.task_id)}: {html.escape(before)} (left) and {html.escape(after)} (right),
threshold {threshold}</h2>
<p>The task shown is {html.escape(rule)}. Each pane opens on the finished program and its verdict;
play replays the denoising.</p>
<div class="row">{''.join(panes)}</div></body></html>
""")


def verdict(p, bench: dict, choice: dict | None) -> dict | None:
    """The claim, read off choice.json (the setting, chosen on validation) and bench.json (the test
    slice, the setting and AR decoded side by side at batch 1 and the larger batches)."""
    from onpolicy.bench import setting_name

    if choice is None:
        return None
    b, ar = p.bench, bench["results"]["ar"]
    base = {"claim": {"speed_vs_ar": b.claim, "tolerance": b.tolerance}, "validation": choice["validation"],
            "validation_n": choice["n"], "ar_validation_pass@1": choice["ar"]["pass@1"],
            "test": bench["tasks"], "test_n": bench["n_tasks"], "ar_pass@1": ar["pass_at_1"],
            "ar_pass@1_ci95": ar.get("pass_at_1_ci95"), "ar_tokens_per_s": ar["tokens_per_s"]}
    chosen = choice["chosen"]
    if chosen is None:
        best = max(choice["settings"], key=lambda r: r["pass@1"])
        return {**base, "met": False, "setting": None, "sentence":
                f"**Claim not met: no setting qualifies.** On {choice['n']} validation tasks every setting "
                "of the final model "
                f"is more than {b.tolerance * 100:g} points below AR's pass@1 ({choice['ar']['pass@1']:.1%}; "
                "the best, "
                f"threshold {best['threshold'] or 'one token per step'}, has {best['pass@1']:.1%})."}
    name = setting_name("diffusion", choice["block_size"], chosen["threshold"])
    r = bench["results"][name]
    met = r["speed_vs_ar"] >= b.claim and within_tolerance(r["pass_at_1"], ar["pass_at_1"], b.tolerance)
    batches = {size: {"speed_vs_ar": rows[name]["speed_vs_ar"], "tokens_per_s": rows[name]["tokens_per_s"],
                      "ar_tokens_per_s": rows["ar"]["tokens_per_s"], "pass@1": rows[name]["pass_at_1"],
                      "ar_pass@1": rows["ar"]["pass_at_1"]} for size,
               rows in bench.get("batches", {}).items()}
    ci, ar_ci = (r.get("pass_at_1_ci95") or [r["pass_at_1"]] * 2, ar.get("pass_at_1_ci95")
                 or [ar["pass_at_1"]] * 2)
    more = "".join(f"; at batch {size}: {x['speed_vs_ar']:.2f}x AR's tokens/s (pass@1 {x['pass@1']:.1%} vs "
                   f"{x['ar_pass@1']:.1%})"
                   for size, x in batches.items())
    sentence = (f"**Claim {'met' if met else 'not met'}: {r['speed_vs_ar']:.2f}x AR's tokens/s at batch 1, "
                "test pass@1 "
                f"{r['pass_at_1']:.1%} [{ci[0]:.1%}, {ci[1]:.1%}] against AR's {ar['pass_at_1']:.1%} "
                f"[{ar_ci[0]:.1%}, {ar_ci[1]:.1%}]** "
                f"({bench['n_tasks']} test tasks of {bench['tasks']}; the setting `{name}` chosen on "
                f"{choice['n']} validation tasks, "
                f"where it scored {chosen['pass@1']:.1%} against AR's {choice['ar']['pass@1']:.1%}; the bar: "
                "at least "
                f"{b.claim:g}x, at most {b.tolerance * 100:g} points below AR){more}.")
    return {**base, "met": met, "setting": {"name": name, "block_size": choice["block_size"],
                                            "threshold": chosen["threshold"],
                                            "validation_pass@1": chosen["pass@1"],
                                            "tokens_per_forward": r["tokens_per_forward"]},
            "pass@1": r["pass_at_1"], "pass@1_ci95": r.get("pass_at_1_ci95"),
            "tokens_per_s": r["tokens_per_s"], "speed_vs_ar": r["speed_vs_ar"], "batches": batches,
            "sentence": sentence}


def training_compute(p, table: dict) -> dict:
    """Train minutes and an estimate of training FLOPs per stage: 6 x parameters x tokens for the
    pre-training stages (block-causal diffusion reads each sequence twice: 2x); stages 3 and 4
    (sampling, replay) at the FLOP rate the pre-training stages reached, times their minutes."""
    out, rates = {}, []
    for stage in p.stages:
        run, minutes = p.output_dir / stage.name, table[stage.name]["train_minutes"]
        cfg = _yaml(run / "config.yaml")
        flops = None
        if cfg.get("stage") == "pretrain":
            params = _parameters(p.hand_on(stage.name))
            t = cfg["train"]
            tokens = t["max_steps"] * t["micro_batch_size"] * t.get("grad_accum", 1) * cfg["data"]["seq_len"]
            flops = 6 * params * tokens * (2 if table[stage.name]["attention"] == "block_causal" else 1)
            if minutes:
                rates.append(flops / (minutes * 60))
        out[stage.name] = {"train_minutes": minutes, "train_flops": flops,
                           "estimated_from": "6 N D" if flops else None}
    rate = sum(rates) / len(rates) if rates else None
    for row in out.values():
        if row["train_flops"] is None and rate:
            row["train_flops"] = rate * row["train_minutes"] * 60
            row["estimated_from"] = "minutes x pre-training FLOP/s"
    return out


def _yaml(path: Path) -> dict:
    import yaml

    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                total += _numel(st.get_slice(key).get_shape())
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _pct(v: dict) -> str:
    return f"{v['value']:.1%} [{v['ci95'][0]:.1%}, {v['ci95'][1]:.1%}]"


def report_summary(table: dict, comparison: dict, last: str, headline: dict) -> dict:
    """report.json's `summary`: the last stage's held-out pass@1 and the headline speed against AR."""
    diffusion = [n for n in table if table[n]["attention"] != "causal"]
    first_fast = table[diffusion[0]]["tokens_per_forward"]["fast"] if diffusion else None
    last_fast = table[last]["tokens_per_forward"]["fast"]
    return {"last_stage": last, "last_pass@1": table[last]["pass@1"]["heldout"]["value"],
            "ar_pass@1": comparison["ar_pass@1"], "speed_vs_ar": headline["speed_vs_ar"],
            "speed_setting": headline["setting"],
            "within_2_points_of_ar": comparison["fastest_within_2_points"] is not None,
            "tokens_per_forward_gain": last_fast / first_fast if first_fast and last_fast else None}


def report_plots(p, table: dict) -> list[str]:
    """Draw the report's figures (and the before/after replay page); their file names."""
    plots = ["losses.png", "stages.png", "frontier.png"]
    plot_losses(p, p.output_dir / "losses.png")
    plot_stages(p, table, p.output_dir / "stages.png")
    if plot_onpolicy(p, p.output_dir / "onpolicy.png"):
        plots.append("onpolicy.png")
    onpolicy_stage = next((s for s in p.stages if (p.output_dir / s.name / "best").is_dir()), None)
    if onpolicy_stage is not None and onpolicy_stage.init_from:
        replay_page(p, onpolicy_stage.init_from, onpolicy_stage.name, p.output_dir / "replay.html",
                    p.eval.fast_threshold)
        plots.append("replay.html")
    return plots


def write_report(p, evals: dict, bench: dict, choice: dict | None = None) -> dict:
    import torch

    table = stage_table(p, evals)
    comparison = ar_comparison(bench)
    last = p.stages[-1].name
    headline = comparison["fastest_within_2_points"] or comparison["best_pass"]
    summary = report_summary(table, comparison, last, headline)
    plots = report_plots(p, table)
    claim = verdict(p, bench, choice)
    compute = training_compute(p, table)
    wall = sum(row["train_minutes"] for row in compute.values())
    report = {"name": p.name, "pipeline": p.source, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "verdict": claim, "compute": compute, "choice": choice,
              "stages": table, "ar_comparison": comparison, "summary": summary, "plots": plots}
    (p.output_dir / "report.json").write_text(json.dumps(report, indent=1))
    fast = f"p>={p.eval.fast_threshold}"
    costs = ", ".join(f"{n} {c['train_minutes']:.1f} min ({c['train_flops']:.2g} FLOPs)" if c["train_flops"]
                      else f"{n} {c['train_minutes']:.1f} min" for n, c in compute.items())
    lines = ([claim["sentence"], ""] if claim else []) + [
        f"# {p.name}: the method end to end", "",
        f"`onpolicy pipeline {p.source}` on {report['machine']['platform']} "
        f"({report['machine']['threads']} threads), {report['created']}.", "",
        f"**Held-out pass@1 after {last}: {_pct(table[last]['pass@1']['heldout'])}** "
        f"(AR baseline in the bench: {comparison['ar_pass@1']:.1%}). Against the AR baseline at batch 1: "
        f"**{headline['speed_vs_ar']:.2f}x its tokens/s** at `{headline['setting']}` "
        f"(pass@1 {headline['pass@1']:.1%}"
        + ("" if summary["within_2_points_of_ar"] else "; no setting stays within 2 points of AR's pass@1")
        + ").", "",
        f"Training compute: {costs}; {wall:.0f} min of training in all.", "",
        "| stage | train min | validation pass@1 | held-out pass@1 | repair pass@1 | tok/fwd (1/step) | "
        f"tok/fwd ({fast}) | held-out pass@1 ({fast}) |",
        "|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        pass_fast, tpf = row["heldout_fast_pass@1"], row["tokens_per_forward"]
        lines.append(f"| {name} | {row['train_minutes']:.1f} | {_pct(row['pass@1']['validation'])} | "
                     f"{_pct(row['pass@1']['heldout'])} | {_pct(row['pass@1']['repair'])} | "
                     f"{tpf['one_per_step']:.2f} | "
                     + (f"{tpf['fast']:.2f} | {_pct(pass_fast)} |" if pass_fast else "- | - |"))
    for name, row in table.items():
        if "best_step" in row:
            lines += ["", f"{name} hands on `best/`, its checkpoint by the stage's rule (both pass@1 within "
                      "the tolerance of its start's, then the most tokens per forward): "
                      + (f"step {row['best_step']}." if row["best_step"] else
                         "**its starting model** (no validation after step 0 met the rule), so this row "
                         "repeats the stage it started from.")]
    lines += ["", "Each row's numbers come back from `onpolicy eval MODEL --tasks SET "
              f"--limit {p.eval.limit} --max-new-tokens {p.eval.max_new_tokens}` "
              f"(add `--threshold {p.eval.fast_threshold}` for the fast columns); "
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
