"""Verifier plugins for the on-policy tests, loaded by spec (`tests.plugins:Name`) as a user's would be."""

import hashlib
import time

from verifiers.base import Verdict


def _coin(text: str) -> bool:
    return hashlib.sha256(text.encode()).digest()[0] % 2 == 0


class CoinVerifier:
    """Passes a completion by a hash of its text: deterministic, about half pass, so groups have spread."""

    def verify(self, tasks, completions):
        return [Verdict(t.task_id, _coin(c), float(_coin(c)), "passed" if _coin(c) else "failed", "coin", 0.0)
                for t, c in zip(tasks, completions)]


class TaskCoinVerifier:
    """Passes every sample of a task or none, by a hash of its id: with an accuracy-only reward no group's
    rewards vary (dynamic sampling finds nothing live)."""

    def verify(self, tasks, completions):
        return [Verdict(t.task_id, _coin(t.task_id), float(_coin(t.task_id)),
                        "passed" if _coin(t.task_id) else "failed", "task coin", 0.0) for t in tasks]


class FailAllVerifier:
    """Fails every completion: no reward varies and nothing is verified."""

    def verify(self, tasks, completions):
        return [Verdict(t.task_id, False, 0.0, "failed", "fails all", 0.0) for t in tasks]


class FlakyVerifier(CoinVerifier):
    """Hangs on chunks holding task 0 of the pool's order, raises on chunks holding task 1, else a coin."""

    def __init__(self, hang_on: str = "generated/train/", raise_on: str = ""):
        self.calls = 0

    def verify(self, tasks, completions):
        self.calls += 1
        if self.calls % 3 == 1:
            time.sleep(3600)  # a hung plugin: the trainer must move on after its timeout
        if self.calls % 3 == 2:
            raise RuntimeError("plugin crashed")
        return super().verify(tasks, completions)


def coin_reward(prompts, completions, completion_ids=None, **columns):
    """The same coin as a TRL reward function (f(prompts, completions, **columns) -> list[float | None])."""
    return [float(_coin(c)) for c in completions]
