"""Generated Python function tasks a small model can learn, with headroom (issue 5, first part).

A seeded compositional grammar: a task is a pipeline of list operations (filters, maps, slices,
orderings) optionally ended by a reduction, over a list of integers; its docstring says in plain
English what to do, its reference solution does it one line per operation, and its test asserts
the reference's outputs on several seeded inputs. Difficulty = number of operations (1-4).

Held-out split, by composition and by behaviour:
- a fixed share of the *pairs of adjacent operation kinds* (e.g. "filter_gt then map_mul") is
  reserved; a held-out task contains at least one reserved pair, a train/validation task none;
- a task's *behaviour* is its reference's outputs on `PROBES`, a fixed, varied set of input lists.
  A fixed share of behaviours (by a hash of the outputs) is reserved too: a held-out task must have a
  reserved behaviour and a train/validation task must not. So no train task computes the same
  function as a held-out task, whatever its wording ("sort decreasing, then sort increasing" is
  "sort increasing"; "sort, double, sort, count" is "count"; commuting filters in another order):
  equal functions give equal outputs, hence the same hash, hence the same side of the split.
  Held-out measures new behaviour, not new wording (`benchmarks/split_twins.py` counts twins).

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
        # 3..10: 2 is filter_even
        Op("filter_div", f"keep the multiples of {k + 1}", f"xs = [x for x in xs if x % {k + 1} == 0]"),
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


_PERMUTATIONS = {"sort_asc", "sort_desc", "reverse"}
_ORDER_FREE_ENDS = {"sort_asc", "sort_desc", "sum", "count", "max", "min"}  # blind to the order of their
# input
_ELEMENTWISE = {"filter_gt", "filter_lt", "filter_even", "filter_odd", "filter_div", "map_add", "map_sub",
                # (unique keeps the same set of values whatever the order)
                "map_mul", "map_mod", "map_square", "unique"}


def _family_pairs(ops: list[Op]) -> list[tuple[str, str]]:
    return [(_family(a), _family(b)) for a, b in zip(ops, ops[1:])]


def has_heldout_pair(ops: list[Op]) -> bool:
    """Whether a task's composition is reserved: a reserved pair in its simplified form (maps that
    shift by a constant counted as one family, so "add 3" and "subtract 2" are one composition)."""
    return any(is_heldout_pair(p) for p in _family_pairs(simplified(ops)))


def _family(op: Op) -> str:
    return "map_shift" if op.kind in ("map_add", "map_sub") else op.kind


def simplified(ops: list[Op]) -> list[Op]:
    """The same function with fewer operations, by rules that hold for every input: a reordering
    (sort, reverse) is dropped when only elementwise operations stand between it and a sort or an
    order-blind reduction ("sort decreasing, then sort increasing" is "sort increasing"; "sort, double
    each, sort, count" is "count" once maps before a count go too); two reverses in a row cancel; an
    operation repeated at once (same filter, unique) is dropped; runs of filters are put in one order
    (filters commute). The split reserves pairs of this form, so wording cannot hide a train task."""
    ops = list(ops)
    changed = True
    while changed:
        changed = False
        for i, op in enumerate(ops):
            rest = ops[i + 1 :]
            j = next((k for k, o in enumerate(rest) if o.kind not in _ELEMENTWISE), None)
            if op.kind in _PERMUTATIONS and j is not None and rest[j].kind in _ORDER_FREE_ENDS:
                del ops[i]
                changed = True
                break
            if op.kind.startswith("map_") and rest and all(o.kind in _PERMUTATIONS
                                                           or o.kind.startswith("map_") for o in rest[:-1]) \
                    and rest[-1].kind == "count" and all(o.kind != "count" for o in rest[:-1]):
                del ops[i]  # maps and reorderings never change how many numbers there are
                changed = True
                break
            if op.kind == "unique" and j is not None and rest[j].kind in ("max", "min", "unique") and all(
                    o.kind in _ELEMENTWISE or o.kind in _PERMUTATIONS for o in rest[:j]):
                del ops[i]  # the largest or smallest value, or the later unique, does not depend on repeats
                changed = True
                break
            if rest and op.kind in ("map_add", "map_sub", "map_mul") and _family(op) == _family(rest[0]):
                del ops[i]  # x + a + b is x + (a + b): one shift (or one product) of another size
                changed = True
                break
            if rest and (op.kind == rest[0].kind == "reverse"):
                del ops[i : i + 2]
                changed = True
                break
            if rest and op.code == rest[0].code and (op.kind.startswith("filter_") or op.kind == "unique"):
                del ops[i]
                changed = True
                break
    out, run = [], []
    for op in ops + [None]:
        if op is not None and op.kind.startswith("filter_"):
            run.append(op)
            continue
        out += sorted(run, key=lambda o: (o.kind, o.code))
        run = []
        if op is not None:
            out.append(op)
    return out


def is_heldout_pair(pair: tuple[str, str], share: float = 0.2) -> bool:
    """A fixed, seed-independent share of operation-kind pairs is reserved for the held-out split."""
    h = int(hashlib.sha256(f"{pair[0]}>{pair[1]}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < share


def _probes() -> tuple[tuple[int, ...], ...]:
    """The fixed inputs that define a task's behaviour: ordinary lists drawn like the tests' own
    (3-10 numbers in -20..80). Few and typical on purpose: two tasks that agree on ordinary lists
    and differ only on rare ones (all negative, one element) are twins for a learner, and a coarse
    behaviour keeps such near-twins on one side of the split."""
    rng = random.Random("onpolicy:behaviour-probes")
    return tuple(tuple(rng.randint(-20, 80) for _ in range(rng.randint(3, 10))) for _ in range(N_PROBES))


N_PROBES = 12
MIN_DISTINCT = 8  # a held-out task's outputs on the probes take at least this many values
PROBES = _probes()


def behaviour(fn) -> tuple:
    """A task's outputs on `PROBES` (what "the same function" means for the split)."""
    out = []
    for xs in PROBES:
        try:
            out.append(fn(list(xs)))
        except Exception as e:  # our own generated code; an error is part of the behaviour
            out.append(type(e).__name__)
    return tuple(out)


def is_heldout_behaviour(outputs: tuple, share: float = 0.25) -> bool:
    """A fixed, seed-independent share of behaviours is reserved for the held-out split."""
    h = int(hashlib.sha256(repr(outputs).encode()).hexdigest()[:8], 16)
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


def _make(rng: random.Random, level: int, name: str) -> tuple[list[Op], str, str, str, object]:
    """`level` list operations, then (half of the time) a reduction; also the reference function."""
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
    return ops, prompt, body, test, fn


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
            raise ValueError(f"only {len(tasks)} distinct {split} tasks exist at levels {levels}; asked for "
                             f"{n}")
        level = live[turn % len(live)]
        name = "solve"
        ops, prompt, body, test, fn = _make(rng, level, name)
        heldout = has_heldout_pair(ops)
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
        outputs = behaviour(fn)
        if is_heldout_behaviour(outputs) != (split == "heldout"):
            continue  # a behaviour of the other side of the split (checked after the cheap tests)
        if split == "heldout" and len(set(map(repr, outputs))) < MIN_DISTINCT:
            continue  # near-constant (mostly [] or 0): a near-twin of many train tasks on any few inputs
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
