"""`onpolicy eval`: pass@k (unbiased estimator) with intervals, speed and verdicts, on
`rollout.decode_tasks`."""

from __future__ import annotations

from verifiers.passk import pass_at_k


def evaluate_checkpoint(model, tokenizer, tasks, sampler_cfg, samples: int, verifier, batch_size: int = 8,
                        seed: int = 0, progress=None, chat: bool = False) -> dict:
    """pass@1 / pass@k, speed and verdict counts of one model on a task list, decoded by
    `rollout.decode_tasks` (the one sampler) and scored by `verifier`.

    Plain mode continues the task prompt and cuts the completion at the next top-level statement; chat
    mode (instruct models) asks for the function in the chat template and runs the reply's code block."""
    from collections import Counter, defaultdict

    from onpolicy.rollout import decode_tasks

    decoded = decode_tasks(model, tokenizer, tasks, sampler_cfg, samples, seed, batch_size, chat,
                           progress=progress)
    rollouts = decoded.rollouts
    verdicts = verifier.verify([r.task for r in rollouts], [r.completion for r in rollouts])
    passed = defaultdict(int)
    for r, v in zip(rollouts, verdicts):
        passed[r.task_index] += v.passed
    ks = sorted({1, samples})
    per_task = {k: [pass_at_k(samples, passed[i], k) for i in range(len(tasks))] for k in ks}
    out = {
        "tasks": len(tasks),
        "samples": samples,
        **{f"pass@{k}": sum(v) / len(v) for k, v in per_task.items()},
        "pass@1_ci95": wilson_interval(sum(passed.values()), len(rollouts)),
        "tokens_per_forward": decoded.tokens_per_forward,
        "forwards_per_token": decoded.forwards_per_token,
        "tokens_per_s": decoded.tokens / decoded.seconds if decoded.seconds else 0.0,
        "remasked": decoded.remasked,
        "status_counts": dict(Counter(v.status for v in verdicts)),
    }
    levels = defaultdict(list)
    for i, t in enumerate(tasks):
        if t.task_id.startswith(("generated/", "repair/")):
            levels[t.task_id.split("/")[2]].append(per_task[1][i])
    if levels:
        out["pass@1_by_level"] = {lvl: sum(v) / len(v) for lvl, v in sorted(levels.items())}
    out["samples_detail"] = [{"task_id": r.task.task_id, "sample": r.sample, "completion": r.completion,
                              "passed": v.passed, "status": v.status, "tokens": r.n_tokens,
                              "forwards": r.forwards} for r, v in zip(rollouts, verdicts)]
    return out


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of a pass rate (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def within_tolerance(pass_at_1: float, bar: float, tolerance: float) -> bool:
    """Whether a pass@1 is at most `tolerance` below `bar` (the quality rule of stage 4's best checkpoint, of
    its frontier report and of the pipeline report's comparison with AR). Exact at the edge: 36/300 is within
    0.02 of 42/300, which `0.12 >= 0.14 - 0.02` rejects in floating point (0.14 - 0.02 =
    0.12000000000000001)."""
    return pass_at_1 >= bar - tolerance - 1e-9


def fastest_within(rows: list[dict], bar: float, tolerance: float, speed: str = "tokens_per_forward"
                   ) -> dict | None:
    """The setting with the highest `speed` whose pass@1 is within `tolerance` of `bar`; None when none is.
    The verdict's choice rule ranks by tokens per forward (rows carry "pass@1" and "tokens_per_forward");
    the report's summary of a bench ranks by measured tokens/s."""
    ok = [r for r in rows if within_tolerance(r["pass@1"], bar, tolerance)]
    return max(ok, key=lambda r: r[speed]) if ok else None


def markdown_table(name: str, result: dict) -> str:
    rows = [("tasks", result["tasks"]), ("samples per task", result["samples"])]
    rows += [(k, f"{v:.3f}") for k, v in result.items() if k.startswith("pass@") and isinstance(v, float)]
    lo, hi = result["pass@1_ci95"]
    rows += [("pass@1 95% interval", f"[{lo:.3f}, {hi:.3f}]"),
             ("tokens per forward", f"{result['tokens_per_forward']:.2f}"),
             ("forwards per token", f"{result['forwards_per_token']:.2f}"),
             ("tokens/s", f"{result['tokens_per_s']:.1f}")]
    rows += [(f"verdict: {k}", n) for k, n in sorted(result["status_counts"].items())]
    rows += [(f"pass@1 {lvl}", f"{v:.3f}") for lvl, v in result.get("pass@1_by_level", {}).items()]
    return f"| {name} | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
