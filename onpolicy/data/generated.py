"""Generated Python function tasks a small model can learn, with headroom (issue 5, first part).

A seeded compositional grammar: a task is a pipeline of list operations (filters, maps, slices,
orderings) optionally ended by a reduction, over a list of integers; its docstring says in plain
English what to do, its reference solution does it one line per operation, and its test asserts
the reference's outputs on several seeded inputs. Difficulty = number of operations (1-4).

Held-out split: a fixed share of the *pairs of adjacent operation kinds* (e.g. "filter_gt then
map_mul") is reserved; a held-out task contains at least one reserved pair, a train/validation task
none. So held-out measures composition, not only new constants.

    tasks = generate_tasks("train", n=1000, seed=0)     # list[verifiers.Task], deterministic

Pure Python (no torch), like the verifiers.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from verifiers.base import Task

SPLITS = ("train", "validation", "heldout")
LEVELS = (1, 2, 3, 4)  # the number of composed list operations


@dataclass(frozen=True)
class Op:
    kind: str  # e.g. "filter_gt"; pairs of kinds define compositions
    phrase: str  # English, as it appears in the docstring
    code: str  # one line of Python on `xs` (or the return expression for a reduction)
    reduce: bool = False


def _list_op(rng: random.Random) -> Op:
    k = rng.randint(2, 9)
    t = rng.randint(0, 60)
    choices = [
        Op("filter_gt", f"keep the numbers greater than {t}", f"xs = [x for x in xs if x > {t}]"),
        Op("filter_lt", f"keep the numbers smaller than {t}", f"xs = [x for x in xs if x < {t}]"),
        Op("filter_even", "keep the even numbers", "xs = [x for x in xs if x % 2 == 0]"),
        Op("filter_odd", "keep the odd numbers", "xs = [x for x in xs if x % 2 == 1]"),
        Op("filter_div", f"keep the multiples of {k + 1}", f"xs = [x for x in xs if x % {k + 1} == 0]"),  # 3..10: 2 is filter_even
        Op("map_add", f"add {k} to each number", f"xs = [x + {k} for x in xs]"),
        Op("map_sub", f"subtract {k} from each number", f"xs = [x - {k} for x in xs]"),
        Op("map_mul", f"multiply each number by {k}", f"xs = [x * {k} for x in xs]"),
        Op("map_mod", f"replace each number by its remainder modulo {k}", f"xs = [x % {k} for x in xs]"),
        Op("map_square", "square each number", "xs = [x * x for x in xs]"),
        Op("sort_asc", "sort the numbers in increasing order", "xs = sorted(xs)"),
        Op("sort_desc", "sort the numbers in decreasing order", "xs = sorted(xs, reverse=True)"),
        Op("reverse", "reverse the order of the numbers", "xs = xs[::-1]"),
        Op("take", f"keep only the first {k} numbers", f"xs = xs[:{k}]"),
        Op("drop", f"drop the first {k} numbers", f"xs = xs[{k}:]"),
        Op("unique", "remove repeated numbers, keeping the first occurrence", "xs = list(dict.fromkeys(xs))"),
    ]
    return rng.choice(choices)


def _reduction(rng: random.Random) -> Op:
    choices = [
        Op("sum", "return their sum", "return sum(xs)", True),
        Op("count", "return how many numbers are left", "return len(xs)", True),
        Op("max", "return the largest one, or 0 if there is none", "return max(xs, default=0)", True),
        Op("min", "return the smallest one, or 0 if there is none", "return min(xs, default=0)", True),
        Op("first", "return the first one, or -1 if there is none", "return xs[0] if xs else -1", True),
        Op("last", "return the last one, or -1 if there is none", "return xs[-1] if xs else -1", True),
    ]
    return rng.choice(choices)


def _pairs(ops: list[Op]) -> list[tuple[str, str]]:
    return [(a.kind, b.kind) for a, b in zip(ops, ops[1:])]


def is_heldout_pair(pair: tuple[str, str], share: float = 0.2) -> bool:
    """A fixed, seed-independent share of operation-kind pairs is reserved for the held-out split."""
    h = int(hashlib.sha256(f"{pair[0]}>{pair[1]}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < share


def _render(ops: list[Op], name: str) -> tuple[str, str]:
    steps = [op.phrase for op in ops]
    text = steps[0][0].upper() + steps[0][1:] + "".join(f", then {s}" for s in steps[1:-1])
    text += (f", and then {steps[-1]}." if len(steps) > 1 else ".")
    if not ops[-1].reduce:
        text += " Return the resulting list."
    prompt = f'def {name}(xs):\n    """Given a list of integers xs: {text}\n    """\n'
    body = "".join(f"    {op.code}\n" for op in ops)
    if not ops[-1].reduce:
        body += "    return xs\n"
    return prompt, body


# Generated tests compare exact types as well as values (a subclass of list or int that claims to be
# equal fails), and generated tasks run in the verifiers' strict mode (verifiers.base.strict_program).
EXACT_COMPARE = "def _same(got, want):\n    return type(got) is type(want) and got == want\n\n\n"


def _make(rng: random.Random, level: int, name: str) -> tuple[list[Op], str, str, str]:
    """`level` list operations, then (half of the time) a reduction."""
    ops = [_list_op(rng) for _ in range(level)]
    if rng.random() < 0.5:
        ops.append(_reduction(rng))
    prompt, body = _render(ops, name)
    namespace: dict = {}
    exec(prompt + body, namespace)  # our own generated code, never model output
    fn = namespace[name]
    lines = []
    for i in range(5):  # one edge case (empty or single), four ordinary lists
        xs = [rng.randint(-20, 80) for _ in range(rng.randint(0, 1) if i == 0 else rng.randint(3, 10))]
        want = fn(list(xs))
        lines.append(f"    assert _same(candidate({xs!r}), {want!r})")
    test = EXACT_COMPARE + "def check(candidate):\n" + "\n".join(lines) + "\n"
    return ops, prompt, body, test


def generate_tasks(split: str, n: int, seed: int = 0, levels: tuple[int, ...] = LEVELS) -> list[Task]:
    """`n` distinct tasks of `split` (train | validation | heldout), taking `levels` in turn.

    Level 1 has only ~1,500 distinct tasks; a level that keeps producing duplicates is retired and
    the others fill the rest (levels 3-4 hold far more than 100k)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' ({', '.join(SPLITS)})")
    rng = random.Random(f"{seed}:{split}")
    tasks, seen = [], set()
    live, misses, turn = list(levels), dict.fromkeys(levels, 0), 0
    while len(tasks) < n:
        if not live:
            raise ValueError(f"only {len(tasks)} distinct {split} tasks exist at levels {levels}; asked for {n}")
        level = live[turn % len(live)]
        name = "solve"
        ops, prompt, body, test = _make(rng, level, name)
        heldout = any(is_heldout_pair(p) for p in _pairs(ops))
        if (split == "heldout") != heldout:
            continue
        if split != "heldout":  # train / validation: disjoint by a hash of the task text
            bucket = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 10
            if (bucket == 0) != (split == "validation"):
                continue
        if prompt in seen:
            misses[level] += 1
            if misses[level] > 2000:
                live.remove(level)
            continue
        seen.add(prompt)
        misses[level] = 0
        turn += 1
        tasks.append(Task(f"generated/{split}/L{level}/{len(tasks)}", prompt, name, test, body, strict=True))
    return tasks


def level_of(task: Task) -> int:
    return int(task.task_id.split("/")[2][1:])


# Repair tasks (the CanItEdit analogue): a correct solution with a planted bug, and the
# instruction to fix it; judged by the same tests. Mutations act on our own generated code.
_MUTATIONS = [
    (r" > ", " < "), (r" < ", " > "), (r" \+ ", " - "), (r" - ", " + "), (r" \* ", " + "),
    (r"== 0", "== 1"), (r"== 1", "== 0"), (r"reverse=True", "reverse=False"), (r"\[::-1\]", "[1:]"),
    (r"xs\[:(\d+)\]", r"xs[\1:]"), (r"xs\[(\d+):\]", r"xs[:\1]"), (r"sum\(xs\)", "max(xs, default=0)"),
    (r"max\(xs, default=0\)", "min(xs, default=0)"), (r"min\(xs, default=0\)", "max(xs, default=0)"),
    (r"len\(xs\)", "len(xs) - 1"), (r"xs\[0\]", "xs[-1]"), (r"xs\[-1\]", "xs[0]"),
]


def _plant_bug(body: str, rng: random.Random) -> str:
    import re

    options = [(p, r) for p, r in _MUTATIONS if re.search(p, body)]
    numbers = list(re.finditer(r"(?<![\w\[])(\d+)(?![\w\]])", body))
    choice = rng.randrange(len(options) + (1 if numbers else 0)) if options or numbers else None
    if choice is None:
        return body
    if choice < len(options):
        pattern, repl = options[choice]
        hits = list(re.finditer(pattern, body))
        m = rng.choice(hits)
        return body[: m.start()] + m.expand(repl) + body[m.end() :]
    m = rng.choice(numbers)  # change one constant
    value = int(m.group(1))
    return body[: m.start()] + str(value + rng.choice([-2, -1, 1, 2, 3])) + body[m.end() :]


def generate_repair_tasks(split: str, n: int, seed: int = 0, levels: tuple[int, ...] = LEVELS) -> list[Task]:
    """`n` repair tasks built from the generated tasks of `split`; every buggy version fails its tests."""
    rng = random.Random(f"{seed}:repair:{split}")
    out = []
    pool = generate_tasks(split, n * 2, seed=seed, levels=levels)
    for task in pool:
        if len(out) == n:
            break
        buggy = _plant_bug(task.canonical_solution, rng)
        if buggy == task.canonical_solution or _passes(task, buggy):
            continue  # an equivalent mutation: not a bug
        header = task.prompt
        prompt = (f"# The function below has a bug. Fix it so that it does what its docstring says.\n"
                  f"{header}{buggy}\n\n# Fixed version:\n{header}")
        out.append(Task(task.task_id.replace("generated/", "repair/", 1), prompt, task.entry_point, task.test,
                        task.canonical_solution, strict=True))
    if len(out) < n:
        raise ValueError(f"only {len(out)} repair tasks could be made from {len(pool)} {split} tasks")
    return out


def buggy_body(task: Task) -> str:
    """The planted bug of a repair task (what an unhelpful model would copy)."""
    return task.prompt.split("# Fixed version:\n")[0].split('"""\n', 2)[-1].rstrip("\n") + "\n"


def _passes(task: Task, body: str) -> bool:
    """Run our own generated code (never model output) in-process to see whether a mutation is a bug."""
    namespace: dict = {}
    try:
        exec(task.prompt + body + "\n" + task.test, namespace)
        namespace["check"](namespace[task.entry_point])
        return True
    except Exception:
        return False
