"""`onpolicy bench`: the speed-quality frontier of the one sampler, AR vs diffusion, in one run.

    onpolicy bench runs/tiny-stage1-mask --ar runs/tiny-ar-baseline --tasks humaneval --limit 16 \\
        --out benchmarks/results/sampler/sampler_cpu.json --png benchmarks/results/sampler/sampler_cpu.png

Every decoder setting decodes the same prompts at batch size 1 (latency as a user sees it); the
settings take turns prompt by prompt so machine noise hits them alike. The AR baseline is the
causal model decoded by the same sampler (block size 1, KV cache). Reported per setting:
tokens/s and its ratio to AR, forwards per token (and tokens per forward), mean latency, sampler
overhead (time outside model forwards), pass@1 through the sandboxed verifier.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from onpolicy.evaluation import wilson_interval
from onpolicy.rollout import Decoded, decode_tasks
from onpolicy.sampling import SamplerConfig


@dataclass
class Setting:
    name: str
    model: str  # "diffusion" | "ar"
    sampler: SamplerConfig


def setting_name(model: str, block_size: int, threshold: float | None = None,
                 steps: int | None = None) -> str:
    """A decoder setting's name in bench.json: "ar", "diffusion B=8 1 tok/step", "diffusion B=8 p>=0.9", ...
    """
    if model == "ar":
        return "ar"
    rule = f"p>={threshold}" if threshold is not None else f"{steps} steps" if steps else "1 tok/step"
    return f"{model} B={block_size} {rule}"


def settings(block_sizes: list[int], thresholds: list[float], max_new_tokens: int, with_ar: bool,
             steps: list[int] | tuple[int, ...] = (), model: str = "diffusion") -> list[Setting]:
    """The decoder grid: AR (block 1), then per block size one token per step, each threshold, each
    fixed number of steps per block, for `model` (the key of the diffusion model in run_bench's dict)."""
    out = [Setting("ar", "ar", SamplerConfig(max_new_tokens=max_new_tokens))] if with_ar else []
    for b in block_sizes:
        out.append(Setting(setting_name(model, b), model,
                           SamplerConfig(max_new_tokens=max_new_tokens, block_size=b)))
        for t in thresholds:
            out.append(Setting(setting_name(model, b, t), model,
                               SamplerConfig(max_new_tokens=max_new_tokens, block_size=b, threshold=t)))
        for k in steps:
            if k < b:
                out.append(Setting(setting_name(model, b, steps=k), model,
                                   SamplerConfig(max_new_tokens=max_new_tokens, block_size=b,
                                                 steps_per_block=k)))
    return out


def run_bench(models: dict, tokenizer, tasks, grid: list[Setting], verifier=None, progress=None,
              batch_size: int = 1) -> dict:
    """models: {"diffusion": model, "ar": model}; tasks: verifiers Task list. Returns per-setting stats.

    Every setting decodes the tasks in batches of `batch_size` (1: each task alone, latency as a user
    sees it; 16: what RL rollouts and a server run) through `rollout.decode_tasks`; settings take turns
    batch by batch, so machine noise hits them alike. Forwards per token is the rollout path's one
    definition (the rows' own forwards)."""
    runs = {s.name: Decoded() for s in grid}
    for s in grid:  # warm-up, untimed
        decode_tasks(models[s.model], tokenizer, tasks[:batch_size], s.sampler, batch_size=batch_size)
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start : start + batch_size]
        for s in grid:
            one = decode_tasks(models[s.model], tokenizer, chunk, s.sampler, batch_size=batch_size,
                               keys=list(range(start, start + len(chunk))))
            acc = runs[s.name]
            acc.rollouts += one.rollouts
            acc.seconds += one.seconds
            acc.model_seconds += one.model_seconds
            if progress:
                progress(len(chunk))
    results = {}
    for s in grid:
        run = runs[s.name]
        passed, interval = None, None
        if verifier is not None:
            verdicts = verifier.verify(list(tasks), [r.completion for r in run.rollouts])
            passed = sum(v.passed for v in verdicts) / len(verdicts)
            interval = wilson_interval(sum(v.passed for v in verdicts), len(verdicts))
        results[s.name] = {
            "model": s.model,
            "lock_step": not s.sampler.per_row,
            "block_size": 1 if s.model == "ar" else s.sampler.block_size,
            "threshold": s.sampler.threshold,
            "steps_per_block": s.sampler.steps_per_block,
            "batch_size": batch_size,
            "tokens": run.tokens,
            "tokens_per_s": run.tokens / run.seconds,
            "forwards_per_token": run.forwards_per_token,
            "tokens_per_forward": run.tokens_per_forward,
            "ms_per_forward": 1000 * run.model_seconds / max(1, sum(r.forwards for r in run.rollouts)),
            "latency_s": run.seconds * batch_size / len(tasks),
            "sampler_overhead": 1.0 - run.model_seconds / run.seconds,
            "pass_at_1": passed,
            "pass_at_1_ci95": interval,
        }
    for r in results.values():  # against AR decoded the same way (lock-step settings against AR in lock-step)
        ar = results.get("ar lock-step" if r["lock_step"] else "ar")
        if ar is not None:
            r["speed_vs_ar"] = r["tokens_per_s"] / ar["tokens_per_s"]
    return results


def plot(results: dict, path: Path, title: str, names: dict[str, str] | None = None,
         batches: dict | None = None) -> None:
    """The speed-quality frontier (tokens/s vs pass@1) and parallelism vs speed, one colour and one
    legend entry per model, the settings of a model joined in order of speed; with `batches`
    ({batch size: results} beyond batch 1) one more frontier panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names or {}
    extra = sorted((batches or {}).items(), key=lambda kv: int(kv[0]))
    fig, axes = plt.subplots(1, 2 + len(extra), figsize=(6 * (2 + len(extra)), 4.8))
    for ax, (size, other) in zip(axes[2:], extra):
        _frontier(ax, other, names, int(size))
    _frontier(axes[0], results, names, 1)
    for i, model in enumerate(dict.fromkeys(_curve(r) for r in results.values())):
        mine = [r for r in results.values() if _curve(r) == model]
        style = _style(model, i)
        axes[1].plot([r["tokens_per_forward"] for r in mine], [r["tokens_per_s"] for r in mine], ls="",
                     label=_label(model, names), **style)
    axes[1].set(xlabel="tokens per forward", ylabel="tokens / s (batch 1)", title="parallelism vs speed")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _frontier(ax, results: dict, names: dict[str, str], batch_size: int) -> None:
    """tokens/s against pass@1, one colour and legend entry per model, its settings joined by speed."""
    for i, model in enumerate(dict.fromkeys(_curve(r) for r in results.values())):
        mine = sorted((r for r in results.values() if _curve(r) == model), key=lambda r: r["tokens_per_s"])
        ax.plot([r["tokens_per_s"] for r in mine], [r["pass_at_1"] or 0.0 for r in mine],
                ls="" if model.startswith("ar") else "-", label=_label(model, names), **_style(model, i))
    top = max((r["pass_at_1"] or 0.0) for r in results.values())
    ax.set(xlabel=f"tokens / s (batch {batch_size})", ylabel="pass@1",
           title=f"speed-quality frontier, batch {batch_size}", ylim=(0, min(1.0, top + 0.1)))


def _curve(r: dict) -> str:
    """The curve a result belongs to: its model, and whether its batch was decoded in lock-step."""
    return r["model"] + (" lock-step" if r.get("lock_step") else "")


def _style(curve: str, i: int) -> dict:
    import matplotlib.pyplot as plt

    style = {"color": "black", "marker": "s"} if curve.startswith("ar") else {"color": plt.cm.tab10(i),
                                                                              "marker": "o"}
    return {**style, "alpha": 0.45, "markerfacecolor": "none"} if curve.endswith("lock-step") else style


def _label(curve: str, names: dict[str, str]) -> str:
    model, _, lock = curve.partition(" ")
    return (names.get(model) or model) + (f" ({lock})" if lock else "")


def run_name(path: str) -> str:
    """A model's name for people: its run folder's name, not "final" or "best"."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.name in ("final", "best") else p.name


def main(args) -> int:
    from tqdm.auto import tqdm

    from onpolicy.data.tasks import check_task_set, load_task_set
    from onpolicy.loading import load_model
    from verifiers.registry import open_verifier, parse_args

    torch.set_num_threads(args.threads or torch.get_num_threads())
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_task_set(args.tasks)  # a bad task set fails before any model loads
    diffusion, tokenizer = load_model(args.checkpoint, args.device)
    models = {"diffusion": diffusion}
    if args.before:  # the same model before a stage: both decoded in this run, side by side
        before, before_tok = load_model(args.before, args.device)
        if before_tok.get_vocab() != tokenizer.get_vocab():
            raise ValueError("the --before checkpoint must share the tokenizer")
        models["before"] = before
    if args.ar:
        ar, ar_tok = load_model(args.ar, args.device)
        if ar_tok.get_vocab() != tokenizer.get_vocab():
            raise ValueError("the AR and diffusion checkpoints must share a tokenizer")
        models["ar"] = ar
    tasks = load_task_set(args.tasks, args.limit, args.seed)
    grid = settings(args.block_sizes, args.thresholds, args.max_new_tokens, with_ar=bool(args.ar),
                    steps=args.steps)
    if args.before:
        grid += settings(args.block_sizes, args.thresholds, args.max_new_tokens, with_ar=False,
                         steps=args.steps, model="before")
    # each setting again with the batch decoded in lock-step (the engine before per-row)
    if getattr(args, "lock_step", False):
        grid += [Setting(f"{s.name} lock-step", s.model, replace(s.sampler, per_row=False)) for s in grid]
    sizes = sorted(set(getattr(args, "batch_sizes", None) or [1]) | {1})  # batch 1 is the headline; larger
    # ones beside it
    by_batch = {}
    spec, extra = getattr(args, "verifier", None), parse_args(getattr(args, "verifier_arg", None))
    with open_verifier(spec, extra,
                       getattr(args, "pass_threshold",
                               None)) as verifier, tqdm(total=len(grid) * len(tasks) * len(sizes),
                                                        desc="bench", unit="gen",
                                                disable=not getattr(args, "progress", True)) as bar:
        for size in sizes:
            by_batch[size] = run_bench(models, tokenizer, tasks, grid, verifier, progress=bar.update,
                                       batch_size=size)
    results = by_batch[1]
    report = {
        "benchmark": "sampler",
        "checkpoint": str(args.checkpoint),
        "ar_checkpoint": str(args.ar) if args.ar else None,
        "before_checkpoint": str(args.before) if args.before else None,
        "tasks": args.tasks,
        "n_tasks": len(tasks),
        "max_new_tokens": args.max_new_tokens,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "results": results,  # batch 1
        "batch_sizes": sizes,
        # the same settings at larger batches
        "batches": {str(size): r for size, r in by_batch.items() if size != 1},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if args.png:
        names = {"diffusion": run_name(args.checkpoint),
                 "before": f"{run_name(args.before)} (before)" if args.before else "",
                 "ar": f"AR: {run_name(args.ar)}" if args.ar else ""}
        plot(results, Path(args.png), f"{args.tasks}, {len(tasks)} prompts, {report['device']}", names,
             report["batches"])
    for size in sizes:
        print(f"batch {size}")
        print_table(by_batch[size])
    print(f"wrote {out}" + (f" and {args.png}" if args.png else ""))
    return 0


def print_table(results: dict) -> None:
    print(f"{'setting':<30} {'tok/s':>8} {'vs AR':>6} {'fwd/tok':>8} {'tok/fwd':>8} {'latency':>8} "
          f"{'overhead':>8} {'pass@1':>7}")
    for name, r in results.items():
        print(f"{name:<30} {r['tokens_per_s']:>8.1f} {r.get('speed_vs_ar', float('nan')):>6.2f} "
              f"{r['forwards_per_token']:>8.2f} "
              f"{r['tokens_per_forward']:>8.2f} {r['latency_s']:>7.2f}s {r['sampler_overhead']:>8.1%} "
              f"{r['pass_at_1'] or 0:>7.3f}")
