"""Find a verifier by name, by "package.module:Class", or through the `onpolicy.verifiers` entry-point group.

    get_verifier("python-tests", workers=4)
    get_verifier("my_pkg.checks:StyleVerifier")
    get_verifier("my_pkg.rewards:format_reward")   # a TRL reward function f(prompts, completions, **kw)
    # pyproject.toml of a plugin:  [project.entry-points."onpolicy.verifiers"]  style = "my_pkg.checks:StyleVerifier"
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from verifiers.base import Verifier

ENTRY_POINT_GROUP = "onpolicy.verifiers"
BUILTIN = {
    "python-tests": "verifiers.python_tests:PythonTestVerifier",
    "remote": "verifiers.remote:RemoteVerifier",
}


def _import(path: str):
    module, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"'{path}' is not of the form package.module:Class")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"cannot import module '{module}' for verifier '{path}': {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module '{module}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def _is_reward_function(obj) -> bool:
    import inspect

    if isinstance(obj, type) or hasattr(obj, "verify") or not callable(obj):
        return False
    try:
        return "completions" in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False


def available() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def get_verifier(spec: str, **kwargs) -> Verifier:
    """Instantiate the verifier named by `spec` with `kwargs`."""
    known = available()
    if spec in known:
        target = _import(known[spec])
    elif ":" in spec:
        target = _import(spec)
    else:
        raise ValueError(f"unknown verifier '{spec}'; known: {', '.join(sorted(known))}, or give package.module:Class")
    # a TRL reward function f(prompts, completions, ...) is wrapped; a class or factory is called with
    # kwargs; an object that already verifies is used as it is
    if _is_reward_function(target):
        from verifiers.trl import RewardFunctionVerifier

        return RewardFunctionVerifier(target, **kwargs)
    verifier = target if hasattr(target, "verify") and not isinstance(target, type) else target(**kwargs)
    if not isinstance(verifier, Verifier):
        raise TypeError(f"'{spec}' gave {type(verifier).__name__}, which has no verify(tasks, completions) method")
    return verifier
