"""Pluggable, sandboxed verifiers of model-written code. Importable without torch.

    from verifiers import PythonTestVerifier, load_tasks
    tasks = load_tasks("humaneval")
    with PythonTestVerifier() as v:
        verdicts = v.verify(tasks, [t.canonical_solution for t in tasks])
"""

from verifiers.base import Task, Verdict, Verifier
from verifiers.python_tests import PythonTestVerifier
from verifiers.sandbox import Limits, Sandbox, SandboxUnavailable
from verifiers.tasks import load_tasks

__all__ = ["Limits", "PythonTestVerifier", "Sandbox", "SandboxUnavailable", "Task", "Verdict", "Verifier",
           "load_tasks"]
