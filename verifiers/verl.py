"""A verl reward function backed by our sandbox.

verl calls `compute_score(data_source, solution_str, ground_truth, extra_info)` per sample (set
`custom_reward_function.path` to this file's path and `custom_reward_function.name=compute_score`).
Here `ground_truth` is the test code (defines `check(candidate)`, human-eval style) or a JSON object
{"test", "entry_point", "prompt"}; `extra_info` may carry `entry_point`, `prompt` (the code the
completion continues), `task_id` and `strict`. `solution_str` is the model's output; a fenced code
block in it is taken when present, and one that defines the entry point itself runs without the prompt.

It returns a dict, as verl's reward managers accept: `score` (1.0 passed, else 0.0), `acc`, and
`excluded` (1.0 when the sandbox itself failed: verl has no "no reward", so filter on it rather than
read that 0 as a wrong program).
"""

from __future__ import annotations

import json
import re
import threading

from verifiers.base import Task
from verifiers.code import extract_code

_lock = threading.Lock()
_verifier = None


def _shared_verifier():
    """One warm sandbox pool per process (verl calls compute_score many times)."""
    global _verifier
    with _lock:
        if _verifier is None:
            from verifiers import PythonTestVerifier

            _verifier = PythonTestVerifier()
        return _verifier


def _task(ground_truth, extra_info: dict) -> Task:
    spec = ground_truth
    if isinstance(spec, str) and spec.lstrip().startswith("{"):
        spec = json.loads(spec)
    if isinstance(spec, dict):
        extra_info = {**extra_info, **spec}
        test = spec.get("test", "")
    else:
        test = str(spec)
    entry = extra_info.get("entry_point")
    if not entry:
        raise ValueError("verl compute_score needs the entry point: extra_info['entry_point'] or "
                         "ground_truth['entry_point']")
    return Task(str(extra_info.get("task_id", "verl")), extra_info.get("prompt", ""), entry, test,
                strict=bool(extra_info.get("strict", False)))


def compute_score(data_source, solution_str: str, ground_truth, extra_info: dict | None = None,
                  verifier=None) -> dict:
    """verl's reward-function signature; `verifier` (any Verifier) replaces the shared sandbox pool."""
    task = _task(ground_truth, extra_info or {})
    completion = extract_code(solution_str)
    # a whole program: no prompt
    if re.search(rf"^def {re.escape(task.entry_point)}\s*\(", completion, re.MULTILINE):
        task = Task(task.task_id, "", task.entry_point, task.test, strict=task.strict)
    verdict = (verifier or _shared_verifier()).verify([task], [completion])[0]
    excluded = verdict.status == "excluded"
    return {"score": 0.0 if excluded else float(verdict.score), "acc": float(verdict.passed),
            "excluded": float(excluded)}
