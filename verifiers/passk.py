"""pass@k: the unbiased estimator, and its mean over tasks with several samples each."""

from __future__ import annotations

from collections import defaultdict
from math import comb

KS = (1, 2, 5, 10, 20, 50, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), for n samples of
    which c passed. Exact integer arithmetic."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1 (n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_at_ks(verdicts) -> tuple[dict[int, float], int, int]:
    """({k: mean pass@k over tasks}, tasks, smallest samples per task) for verdicts with several
    samples per task; excluded verdicts (no verdict on the program) are left out. k runs over KS up
    to the smallest number of samples any task has."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for v in verdicts:
        if v.status != "excluded":
            per_task[v.task_id].append(v.passed)
    if not per_task:
        return {}, 0, 0
    n_min = min(len(s) for s in per_task.values())
    ks = [k for k in KS if k <= n_min]
    return ({k: sum(pass_at_k(len(s), sum(s), k) for s in per_task.values()) / len(per_task) for k in ks},
            len(per_task), n_min)
