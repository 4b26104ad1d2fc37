"""Do two pipeline runs agree? For a change meant to keep behaviour (a restructuring): run the same seeded
pipeline before and after it, then

    python benchmarks/compare_runs.py RUN_BEFORE RUN_AFTER --out benchmarks/results/restructure/same_run.json

It compares what a seeded run fixes: every number of report.json except wall-clock ones (minutes,
seconds, tokens/s, speed ratios, FLOPs estimated from minutes, dates), each stage's logged training
metrics (losses, gradient norms, rewards...; times left out), the bench's pass@1 and forwards per token per
setting, and the SHA-256 of every exported model's weights. Exit code 1 if anything differs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from onpolicy.files import file_digest

# wall-clock quantities: they differ between any two runs on a shared machine
TIMING = re.compile(r"(^|/)(time|perf)(/|$)|minutes|seconds|_s$|speed_vs|created|elapsed")


def flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flatten(sub, f"{prefix}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, sub in enumerate(value) for k, v in flatten(sub, f"{prefix}[{i}]").items()}
    return {prefix: value}


def deterministic(flat: dict) -> dict:
    """The entries a seeded run fixes: no wall-clock key, no FLOPs estimated from minutes."""
    from_minutes = {k.rsplit("/", 1)[0] for k, v in flat.items()
                    if k.endswith("/estimated_from") and "minutes" in str(v)}
    return {k: v for k, v in flat.items() if not TIMING.search(k)
            and not (k.endswith("/train_flops") and k.rsplit("/", 1)[0] in from_minutes)}


def metrics(run: Path) -> dict:
    """Each stage's logged metrics, step by step, without the timing ones."""
    out = {}
    for path in sorted(run.glob("*/metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.parent.name] = [deterministic(flatten(row)) for row in rows]
    return out


def weights(run: Path) -> dict:
    """SHA-256 of every exported model's weights (final/, best/), by path inside the run."""
    return {str(p.relative_to(run)): file_digest(p)
            for p in sorted(run.glob("*/*/model.safetensors")) if p.parent.name in ("final", "best")}


def bench(run: Path) -> dict:
    data = json.loads((run / "bench.json").read_text()) if (run / "bench.json").is_file() else {}
    return {name: {k: r.get(k) for k in ("pass_at_1", "forwards_per_token", "tokens")}
            for name, r in data.get("results", {}).items()}


def compare(before: Path, after: Path) -> dict:
    parts = {
        "report": (deterministic(flatten(json.loads((before / "report.json").read_text()))),
                   deterministic(flatten(json.loads((after / "report.json").read_text())))),
        "metrics": (metrics(before), metrics(after)),
        "bench": (bench(before), bench(after)),
        "weights": (weights(before), weights(after)),
    }
    out = {"before": str(before), "after": str(after), "identical": True, "compared": {}, "differences": {}}
    for name, (a, b) in parts.items():
        fa, fb = flatten(a), flatten(b)
        diff = {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
        out["compared"][name] = len(set(fa) | set(fb))
        if diff:
            out["identical"] = False
            out["differences"][name] = dict(list(diff.items())[:50])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--out", default=None, help="write the comparison here (JSON)")
    args = ap.parse_args()
    for run in (args.before, args.after):
        if not (run / "report.json").is_file():
            sys.exit(f"{run}: no report.json (not a finished pipeline run folder)")
    result = compare(args.before, args.after)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    counts = ", ".join(f"{n} {name}" for name, n in result["compared"].items())
    print(("identical" if result["identical"] else "DIFFERENT") + f": compared {counts}")
    for name, diff in result["differences"].items():
        for key, (a, b) in list(diff.items())[:10]:
            print(f"  {name}{key}: {a!r} -> {b!r}")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
