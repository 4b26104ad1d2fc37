"""Adapters both ways between our verifiers and TRL reward functions.

TRL's reward-function signature (GRPOTrainer): f(prompts, completions, completion_ids, trainer_state,
**columns) -> list[float | None], where the dataset's other columns arrive as keyword lists. `None`
means "no reward for this sample": TRL leaves it out of that function's statistics (nanmean), and so
do we for infrastructure failures (status "excluded"): a broken sandbox or a server that is down is
never a 0 reward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from verifiers.base import Task, Verdict, Verifier
from verifiers.code import extract_code

logger = logging.getLogger("verifiers.trl")


def as_reward_function(verifier: Verifier, tasks: dict[str, Task] | None = None,
                       name: str | None = None) -> Callable:
    """A TRL reward function backed by `verifier`.

    The task of each completion is found by the dataset column `task_id` in `tasks`, or built from
    the columns `task_id, prompt, entry_point, test` when `tasks` is None.
    """

    def reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]:
        n = len(completions)
        ids = columns.get("task_id")
        if tasks is not None:
            if ids is None:
                raise KeyError("the dataset needs a 'task_id' column to find each completion's task")
            batch = [tasks[str(i)] for i in ids]
        else:
            missing = [c for c in ("entry_point", "test") if c not in columns]
            if missing:
                raise KeyError(f"the dataset lacks columns {missing}; pass tasks= or add them")
            batch = [
                Task(str(ids[i]) if ids else str(i), _text(prompts[i]), columns["entry_point"][i],
                     columns["test"][i])
                for i in range(n)
            ]
        try:
            verdicts = verifier.verify(batch, [extract_code(_text(c)) for c in completions])
        except Exception as e:  # the verifier itself broke: no verdicts (None), not zero rewards, and say why
            _warn_raised(reward.__name__, e)
            return [None] * n
        return [None if v.status == "excluded" else v.score for v in verdicts]

    reward.__name__ = name or f"{type(verifier).__name__}_reward"
    return reward


_raised: dict[str, int] = {}


def _warn_raised(name: str, e: Exception) -> None:
    """A warning with the reason when the verifier behind a reward function raises: the first three times
    for each kind of error, then every hundredth (TRL calls the reward every step)."""
    key = f"{type(e).__name__}: {e}"
    _raised[key] = _raised.get(key, 0) + 1
    count = _raised[key]
    if count <= 3 or count % 100 == 0:
        logger.warning("%s: the verifier raised %s (%d times so far); these completions get None (no reward)",
                       name, key, count)


def _text(x) -> str:
    """TRL passes plain strings, or chat messages [{role, content}] for conversational data."""
    if isinstance(x, str):
        return x
    if isinstance(x, list) and x and isinstance(x[-1], dict):
        return str(x[-1].get("content", ""))
    return str(x)


class RewardFunctionVerifier:
    """Any TRL reward function as a verifier. Scores are clipped to [0, 1]; `None` (the function's
    'not applicable') and exceptions become status 'excluded' with the reason (no verdict: trainers
    leave them out, as TRL does with None)."""

    def __init__(self, fn: Callable, pass_threshold: float = 1.0):
        self.fn, self.pass_threshold = fn, pass_threshold
        self.name = getattr(fn, "__name__", "reward_function")

    def verify(self, tasks: list[Task], completions: list[str]) -> list[Verdict]:
        # what GRPOTrainer passes: prompts, completions, completion_ids, trainer_state, and the dataset's
        # columns (a task's fields) as keyword lists
        columns = {
            "task_id": [t.task_id for t in tasks],
            "entry_point": [t.entry_point for t in tasks],
            "test": [t.test for t in tasks],
            "canonical_solution": [t.canonical_solution for t in tasks],
        }
        try:
            scores = list(self.fn(prompts=[t.prompt for t in tasks], completions=list(completions),
                                  completion_ids=None, trainer_state=None, **columns))
        except Exception as e:  # a crashing reward function costs these samples, not the run
            return [Verdict(t.task_id, False, 0.0, "excluded", f"{self.name} raised {type(e).__name__}: {e}",
                            0.0) for t in tasks]
        if len(scores) != len(tasks):
            return [Verdict(t.task_id, False, 0.0, "excluded",
                            f"{self.name} returned {len(scores)} scores for {len(tasks)}", 0.0)
                    for t in tasks]
        out = []
        for t, s in zip(tasks, scores):
            if s is None:
                out.append(Verdict(t.task_id, False, 0.0, "excluded", f"{self.name} returned None", 0.0))
                continue
            score = min(1.0, max(0.0, float(s)))
            passed = score >= self.pass_threshold
            out.append(Verdict(t.task_id, passed, score, "passed" if passed else "failed",
                               f"reward {float(s):.4g}", 0.0))
        return out
