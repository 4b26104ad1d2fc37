"""The unit-test verifier: runs prompt + completion + tests in the sandbox, passed = all asserts held."""

from __future__ import annotations

from verifiers.base import Task, Verdict
from verifiers.sandbox import Limits, Sandbox


class PythonTestVerifier:
    """Score 1.0 when `check(entry_point)` ran to the end inside the sandbox, else 0.0.

    `strict`: None follows each task's own flag (generated tasks are strict), True checks every
    task's return values for exact builtin types (verifiers.base.strict_program), False none."""

    name = "python-tests"

    def __init__(self, workers: int | None = None, limits: Limits | None = None, unsafe: bool = False,
                 sandbox: Sandbox | None = None, strict: bool | None = None):
        self.strict = strict
        self._own = sandbox is None
        self.sandbox = sandbox or Sandbox(workers=workers, limits=limits, unsafe=unsafe)

    def verify(self, tasks: list[Task], completions: list[str]) -> list[Verdict]:
        if len(tasks) != len(completions):
            raise ValueError(f"{len(tasks)} tasks but {len(completions)} completions")
        programs = [t.program(c, self.strict) for t, c in zip(tasks, completions)]
        results = self.sandbox.run_many(programs)
        return [
            Verdict(t.task_id, r.status == "passed", 1.0 if r.status == "passed" else 0.0, r.status, r.detail,
                    round(r.seconds, 4))
            for t, r in zip(tasks, results)
        ]

    def worst_case_seconds(self, n: int) -> float:
        """How long `n` programs may take when every one of them runs to its own timeout: a caller that
        waits less would call hanging programs (failures) infrastructure trouble (excluded)."""
        workers = max(1, len(getattr(self.sandbox, "_workers", [])) or 1)
        return -(-n // workers) * (self.sandbox.limits.timeout_s + 10.0)

    def close(self) -> None:
        if self._own:
            self.sandbox.close()

    def __enter__(self) -> PythonTestVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
