"""`onpolicy bench`: the speed-quality frontier of the one sampler, AR vs diffusion, in one run.

    onpolicy bench runs/tiny-stage1-mask --ar runs/tiny-ar-baseline --tasks humaneval --limit 16 \\
        --out benchmarks/results/sampler_cpu.json --png benchmarks/results/sampler_cpu.png

Every decoder setting decodes the same prompts at batch size 1 (latency as a user sees it); the
settings take turns prompt by prompt so machine noise hits them alike. The AR baseline is the
causal model decoded by the same sampler (block size 1, KV cache). Reported per setting:
tokens/s and its ratio to AR, forwards per token (and tokens per forward), mean latency, sampler
overhead (time outside model forwards), pass@1 through the sandboxed verifier.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from onpolicy.rollout import Decoded, decode_tasks
from onpolicy.sampling import SamplerConfig


@dataclass
class Setting:
    name: str
    model: str  # "diffusion" | "ar"
    sampler: SamplerConfig


def settings(block_sizes: list[int], thresholds: list[float], max_new_tokens: int, with_ar: bool,
             steps: list[int] | tuple[int, ...] = ()) -> list[Setting]:
    """The decoder grid: AR (block 1), then per block size one token per step, each threshold, each
    fixed number of steps per block."""
    out = [Setting("ar", "ar", SamplerConfig(max_new_tokens=max_new_tokens))] if with_ar else []
    for b in block_sizes:
        out.append(Setting(f"diffusion B={b} 1 tok/step", "diffusion", SamplerConfig(max_new_tokens=max_new_tokens, block_size=b)))
        for t in thresholds:
            out.append(Setting(f"diffusion B={b} p>={t}", "diffusion",
                               SamplerConfig(max_new_tokens=max_new_tokens, block_size=b, threshold=t)))
        for k in steps:
            if k < b:
                out.append(Setting(f"diffusion B={b} {k} steps", "diffusion",
                                   SamplerConfig(max_new_tokens=max_new_tokens, block_size=b, steps_per_block=k)))
    return out


def run_bench(models: dict, tokenizer, tasks, grid: list[Setting], verifier=None, progress=None) -> dict:
    """models: {"diffusion": model, "ar": model}; tasks: verifiers Task list. Returns per-setting stats.

    Every setting decodes every task alone (batch 1) through `rollout.decode_tasks`; settings take turns
    task by task. Forwards per token is the rollout path's one definition (the rows' own forwards)."""
    runs = {s.name: Decoded() for s in grid}
    for s in grid:  # warm-up, untimed
        decode_tasks(models[s.model], tokenizer, tasks[:1], s.sampler, batch_size=1)
    for task in tasks:
        for s in grid:
            one = decode_tasks(models[s.model], tokenizer, [task], s.sampler, batch_size=1)
            acc = runs[s.name]
            acc.rollouts += one.rollouts
            acc.seconds += one.seconds
            acc.model_seconds += one.model_seconds
            if progress:
                progress(1)
    results = {}
    for s in grid:
        run = runs[s.name]
        passed = None
        if verifier is not None:
            verdicts = verifier.verify(list(tasks), [r.completion for r in run.rollouts])
            passed = sum(v.passed for v in verdicts) / len(verdicts)
        results[s.name] = {
            "model": s.model,
            "block_size": s.sampler.block_size if s.model == "diffusion" else 1,
            "threshold": s.sampler.threshold,
            "steps_per_block": s.sampler.steps_per_block,
            "tokens": run.tokens,
            "tokens_per_s": run.tokens / run.seconds,
            "forwards_per_token": run.forwards_per_token,
            "tokens_per_forward": run.tokens_per_forward,
            "ms_per_forward": 1000 * run.model_seconds / max(1, sum(r.forwards for r in run.rollouts)),
            "latency_s": run.seconds / len(tasks),
            "sampler_overhead": 1.0 - run.model_seconds / run.seconds,
            "pass_at_1": passed,
        }
    if "ar" in results:
        for r in results.values():
            r["speed_vs_ar"] = r["tokens_per_s"] / results["ar"]["tokens_per_s"]
    return results


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        color = "black" if r["model"] == "ar" else plt.cm.viridis(min(1.0, r["block_size"] / 32))
        marker = "s" if r["model"] == "ar" else ("o" if r["threshold"] is None else "^")
        axes[0].scatter(r["tokens_per_s"], r["pass_at_1"] or 0.0, color=color, marker=marker)
        axes[0].annotate(name.replace("diffusion ", ""), (r["tokens_per_s"], r["pass_at_1"] or 0.0), fontsize=7)
        axes[1].scatter(r["tokens_per_forward"], r["tokens_per_s"], color=color, marker=marker)
        axes[1].annotate(name.replace("diffusion ", ""), (r["tokens_per_forward"], r["tokens_per_s"]), fontsize=7)
    axes[0].set(xlabel="tokens / s (batch 1)", ylabel="pass@1", title="speed-quality frontier", ylim=(-0.03, 1.03))
    axes[1].set(xlabel="tokens per forward", ylabel="tokens / s", title="parallelism vs speed")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(args) -> int:
    from tqdm.auto import tqdm

    from onpolicy.data.tasks import load_task_set
    from onpolicy.loading import load_model
    from verifiers import PythonTestVerifier

    torch.set_num_threads(args.threads or torch.get_num_threads())
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    diffusion, tokenizer = load_model(args.checkpoint, args.device)
    models = {"diffusion": diffusion}
    if args.ar:
        ar, ar_tok = load_model(args.ar, args.device)
        if ar_tok.get_vocab() != tokenizer.get_vocab():
            raise ValueError("the AR and diffusion checkpoints must share a tokenizer")
        models["ar"] = ar
    tasks = load_task_set(args.tasks, args.limit, args.seed)
    grid = settings(args.block_sizes, args.thresholds, args.max_new_tokens, with_ar=bool(args.ar), steps=args.steps)
    with PythonTestVerifier() as verifier, tqdm(total=len(grid) * len(tasks), desc="bench", unit="gen") as bar:
        results = run_bench(models, tokenizer, tasks, grid, verifier, progress=bar.update)
    report = {
        "benchmark": "sampler",
        "checkpoint": str(args.checkpoint),
        "ar_checkpoint": str(args.ar) if args.ar else None,
        "tasks": args.tasks,
        "n_tasks": len(tasks),
        "max_new_tokens": args.max_new_tokens,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if args.png:
        plot(results, Path(args.png), f"{Path(args.checkpoint).name} vs AR on {args.tasks} ({len(tasks)} prompts, {report['device']})")
    print(f"{'setting':<28} {'tok/s':>8} {'vs AR':>6} {'fwd/tok':>8} {'tok/fwd':>8} {'latency':>8} {'overhead':>8} {'pass@1':>7}")
    for name, r in results.items():
        print(f"{name:<28} {r['tokens_per_s']:>8.1f} {r.get('speed_vs_ar', float('nan')):>6.2f} {r['forwards_per_token']:>8.2f} "
              f"{r['tokens_per_forward']:>8.2f} {r['latency_s']:>7.2f}s {r['sampler_overhead']:>8.1%} {r['pass_at_1'] or 0:>7.3f}")
    print(f"wrote {out}" + (f" and {args.png}" if args.png else ""))
    return 0
