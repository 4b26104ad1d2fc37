"""Load test of sharded remote verification: a fleet of `verifiers serve` processes on loopback, one
of them killed mid-run, thousands of programs through one `RemoteVerifier`.

    python benchmarks/remote_load.py --programs 5000 --servers 2 --out
    benchmarks/results/fleet/remote_load_cpu.json

Each program is a tiny task with a known answer (even-numbered ones correct, odd ones wrong), so
every verdict can be checked, not only counted. Reported: verdicts by status, wrong verdicts,
programs lost (no verdict) or duplicated (two verdicts), the excluded ones with their reasons, and
each server's answers and throughput (answers per second over the run). `--verdicts` writes every
verdict as JSONL.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from verifiers.base import Task
from verifiers.remote import RemoteVerifier

ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def start_server(workers: int) -> tuple[subprocess.Popen, str]:
    """`verifiers serve` on a free loopback port; returns (process, URL) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "verifiers.cli", "serve", "--port", "0", "--workers",
                             str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/run_code", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"verifiers serve did not start: {line!r}")
    return proc, f"http://127.0.0.1:{match.group(1)}"


def run_load(programs: int, servers: int, workers: int, concurrency: int,
             kill_after: float) -> tuple[dict, list[dict]]:
    tasks = [Task(f"load/{i}", "def add(a, b):\n", "add", ADD_TEST) for i in range(programs)]
    completions = ["    return a + b\n" if i % 2 == 0 else "    return a - b\n" for i in range(programs)]
    fleet = [start_server(workers) for _ in range(servers)]
    urls = [url for _, url in fleet]
    client = RemoteVerifier(urls, timeout_s=10, concurrency=concurrency, retries=2, cooldown_s=2.0)
    killed = {}

    def kill_one_midway():  # our own child process, by its handle
        while sum(client.answered.values()) < kill_after * programs:
            time.sleep(0.01)
        proc, url = fleet[-1]
        proc.kill()
        proc.wait()
        killed.update(url=url, after_verdicts=sum(client.answered.values()),
                      at_s=round(time.monotonic() - start, 2))

    start = time.monotonic()
    killer = threading.Thread(target=kill_one_midway, daemon=True) if servers > 1 and kill_after < 1 else None
    if killer:
        killer.start()
    try:
        verdicts = client.verify(tasks, completions)
    finally:
        seconds = time.monotonic() - start
        for proc, _ in fleet:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    ids = [v.task_id for v in verdicts]
    expected = {t.task_id: i % 2 == 0 for i, t in enumerate(tasks)}
    wrong = [v.task_id for v in verdicts if v.status != "excluded" and v.passed != expected[v.task_id]]
    report = {
        "programs": programs,
        "servers": servers,
        "workers_per_server": workers,
        "concurrency_per_server": concurrency,
        "seconds": round(seconds, 2),
        "programs_per_s": round(programs / seconds, 1),
        "killed": killed,
        "statuses": dict(Counter(v.status for v in verdicts)),
        "wrong_verdicts": len(wrong),
        "lost": len(set(expected) - set(ids)),
        "duplicated": len(ids) - len(set(ids)),
        "in_order": ids == [t.task_id for t in tasks],
        "excluded": [{"task_id": v.task_id, "reason": v.detail} for v in verdicts if v.status == "excluded"],
        "per_server": {u: {"answered": client.answered[u], "failed_requests": client.failures[u],
                           "answers_per_s": round(client.answered[u] / seconds, 1)} for u in urls},
    }
    return report, [v.to_json() for v in verdicts]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--programs", type=int, default=5000)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="sandbox workers per server")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight per server")
    p.add_argument("--kill-after", type=float, default=0.3,
                   help="kill the last server after this share of verdicts (1 = never)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--verdicts", type=Path, default=None, help="also write every verdict here (JSONL)")
    args = p.parse_args()
    report, verdicts = run_load(args.programs, args.servers, args.workers, args.concurrency, args.kill_after)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.verdicts:
        args.verdicts.write_text("".join(json.dumps(v) + "\n" for v in verdicts))
    summary = {k: report[k] for k in ("programs", "seconds", "programs_per_s", "statuses", "wrong_verdicts",
                                      "lost", "duplicated")}
    print(json.dumps(summary), json.dumps(report["per_server"]), f"killed: {report['killed']}", sep="\n")


if __name__ == "__main__":
    main()
