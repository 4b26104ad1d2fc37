"""Find a verifier by name, by "package.module:Class", or through the `onpolicy.verifiers` entry-point group.

    get_verifier("python-tests", workers=4)
    get_verifier("my_pkg.checks:StyleVerifier")
    get_verifier("my_pkg.rewards:format_reward")   # a TRL reward function f(prompts, completions, **kw)
    # pyproject.toml of a plugin:  [project.entry-points."onpolicy.verifiers"]  style =
    "my_pkg.checks:StyleVerifier"
"""

from __future__ import annotations

import contextlib
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


def resolve(spec: str):
    """The class, factory, object or reward function `spec` names, imported but not built (ValueError if
    none)."""
    known = available()
    if spec in known:
        return _import(known[spec])
    if ":" in spec:
        return _import(spec)
    raise ValueError(f"unknown verifier '{spec}'; known: {', '.join(sorted(known))}, or give "
                     "package.module:Class")


def _check_arguments(spec: str, target, kwargs: dict) -> None:
    import inspect

    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        takes = (", ".join(n for n, p in params.items()
                           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or "no arguments")
        why = (" (rollout.strict / --strict set: give the plugin a `strict` parameter, or leave strict unset)"
               if "strict" in unknown else "")
        raise TypeError(f"verifier '{spec}' takes no argument '{unknown[0]}'{why}; it takes: {takes}")


def with_pass_threshold(verifier: Verifier, threshold: float | None) -> Verifier:
    """A verifier whose verdicts count as passed when their score reaches `threshold` (graded rewards:
    a reward function that returns 0.7 for a good answer never says 1.0). None keeps the plugin's own."""
    return verifier if threshold is None else PassThreshold(verifier, threshold)


class PassThreshold:
    """See `with_pass_threshold`. Excluded verdicts stay excluded."""

    def __init__(self, inner: Verifier, threshold: float):
        self.inner, self.threshold = inner, threshold

    def verify(self, tasks, completions):
        from dataclasses import replace

        return [v if v.status == "excluded" else replace(v, passed=v.score >= self.threshold)
                for v in self.inner.verify(tasks, completions)]

    def __getattr__(self, name):  # close(), __enter__ ... of the plugin
        return getattr(self.inner, name)


@contextlib.contextmanager
def open_verifier(spec: str | None = None, args: dict | None = None, pass_threshold: float | None = None):
    """The verifier `eval`, `bench` and `verify` run: the sandboxed Python tests by default, or the plugin
    `spec` built with `args`; closed afterwards when it can be."""
    verifier = get_verifier(spec or "python-tests", **(args or {}))
    try:
        yield with_pass_threshold(verifier, pass_threshold)
    finally:
        if hasattr(verifier, "close"):
            verifier.close()


def parse_args(pairs: list[str] | None) -> dict:
    """`--verifier-arg KEY=VALUE` pairs as a dict, each value read as YAML (numbers, true/false, lists)."""
    import yaml

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--verifier-arg '{pair}' is not KEY=VALUE")
        out[key] = yaml.safe_load(value) if value else ""
    return out


def describe() -> list[tuple[str, str]]:
    """(name, target) of every verifier `get_verifier` knows by name: built-in and entry points."""
    return sorted(available().items())


def available() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def get_verifier(spec: str, **kwargs) -> Verifier:
    """Instantiate the verifier named by `spec` with `kwargs` (a plugin's own arguments, e.g. from a
    recipe's `rollout.verifier_args`). An argument the plugin does not take is named in the error."""
    target = resolve(spec)
    # a TRL reward function f(prompts, completions, ...) is wrapped; a class or factory is called with
    # kwargs; an object that already verifies is used as it is
    if _is_reward_function(target):
        from verifiers.trl import RewardFunctionVerifier

        return RewardFunctionVerifier(target, **kwargs)
    if hasattr(target, "verify") and not isinstance(target, type):
        verifier = target
    else:
        _check_arguments(spec, target, kwargs)
        verifier = target(**kwargs)
    if not isinstance(verifier, Verifier):
        raise TypeError(f"'{spec}' gave {type(verifier).__name__}, which has no verify(tasks, completions) "
                        "method")
    return verifier
