"""The task study: tiny AR baseline vs tiny diffusion (from scratch, and from AR weights) at equal
training compute, pass@1 by difficulty level on the generated validation and held-out splits.

Train first (README, "Generated tasks: what a tiny model learns"), then:

    python benchmarks/task_study.py --out benchmarks/results/task_study/task_study.json --md
    benchmarks/results/task_study/task_study.md

Compute is counted as training FLOPs, 6 x parameters x tokens through the network: a block-causal
diffusion step reads each sequence twice (noisy blocks + clean context, BD3-LM), so it counts double;
the AR-initialised model carries the FLOPs of the AR run it started from. Wall-clock seconds are
reported too (from metrics.jsonl), but they depend on what else ran on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml


def training_cost(run: Path) -> dict:
    """FLOPs and seconds of one run, from its saved config and metrics."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text())
    t = cfg["train"]
    tokens = summary["steps"] * t["micro_batch_size"] * t.get("grad_accum", 1) * cfg["data"]["seq_len"]
    passes = 2 if cfg["model"]["attention"] == "block_causal" else 1
    times = [json.loads(line).get("time", 0.0) for line in (run / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
    return {"steps": summary["steps"], "tokens": tokens, "flops": 6.0 * summary["params"] * tokens * passes,
            "seconds": max(times, default=0.0), "val_loss_end": summary["val_loss_end"]}


def main() -> int:
    from onpolicy.data.tasks import load_task_set
    from onpolicy.evaluation import evaluate_checkpoint
    from onpolicy.loading import load_model
    from onpolicy.sampling import SamplerConfig
    from verifiers import PythonTestVerifier

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs=3, action="append", metavar=("NAME", "RUN", "INIT_RUN"),
                   help="a model to evaluate: its run folder and the run it was initialised from ('-' for "
                        "none)")
    p.add_argument("--limit", type=int, default=400, help="tasks per split")
    p.add_argument("--threshold", type=float, default=None,
                   help="also decode the diffusion models with this commit threshold")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/task_study/task_study.json")
    p.add_argument("--md", default=None)
    args = p.parse_args()
    models = args.model or [["AR baseline", "runs/tiny-tasks-ar", "-"],
                            ["diffusion, from scratch", "runs/tiny-tasks-mask", "-"],
                            ["diffusion, from AR, unshifted", "runs/tiny-tasks-from-ar-noshift",
                             "runs/tiny-tasks-ar-300"],
                            ["diffusion, from AR (shift_logits)", "runs/tiny-tasks-from-ar",
                             "runs/tiny-tasks-ar-300"], ["diffusion, from AR (shift_logits, block 4)",
                                                         "runs/tiny-tasks-from-ar-b4",
                                                         "runs/tiny-tasks-ar-300"]]
    if args.threads:
        torch.set_num_threads(args.threads)

    splits = {s: load_task_set(f"generated:{s}", args.limit) for s in ("validation", "heldout")}
    rows = []
    with PythonTestVerifier() as verifier:
        for name, run, init in models:
            cost = training_cost(Path(run))
            if init != "-":
                before = training_cost(Path(init))
                cost = {**cost, "flops": cost["flops"] + before["flops"],
                        "seconds": cost["seconds"] + before["seconds"],
                        "steps": f"{before['steps']} AR + {cost['steps']}"}
            model, tokenizer = load_model(run)
            decodings = [("one token per step", None)]
            if args.threshold is not None and model.config.attention != "causal":
                decodings.append((f"threshold {args.threshold}", args.threshold))
            for decoding, threshold in decodings:
                if threshold is not None and not any(r["pass@1"] > 0 for r in rows if r["run"] == run):
                    continue  # a faster decoding of a model that solves nothing measures nothing
                for split, tasks in splits.items():
                    tic = time.perf_counter()
                    cfg = SamplerConfig(max_new_tokens=96, threshold=threshold)
                    result = evaluate_checkpoint(model, tokenizer, tasks, cfg, samples=1, verifier=verifier,
                                                 batch_size=32)
                    rows.append({"model": name, "run": run, "decoding": decoding, "split": split,
                                 "training": cost, "eval_seconds": time.perf_counter() - tic, **result})
                    print(f"{name:26s} {decoding:20s} {split:10s} pass@1 {result['pass@1']:.3f} "
                          f"{result.get('pass@1_by_level')} "
                          f"forwards/token {result['forwards_per_token']:.2f}", flush=True)
    out = {"limit": args.limit, "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    table = markdown(rows)
    if args.md:
        Path(args.md).write_text(table)
    print(table)
    return 0


def markdown(rows: list[dict]) -> str:
    levels = sorted({lvl for r in rows for lvl in r.get("pass@1_by_level", {})})
    head = ["model", "training steps", "train PFLOPs", "decoding", "split", "pass@1", *levels,
            "tokens per forward"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        by_level = r.get("pass@1_by_level", {})
        cells = [r["model"], str(r["training"]["steps"]), f"{r['training']['flops'] / 1e15:.2f}",
                 r["decoding"], r["split"], f"{r['pass@1']:.3f}",
                 *(f"{by_level[lvl]:.2f}" if lvl in by_level else "" for lvl in levels),
                 f"{1 / r['forwards_per_token']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
