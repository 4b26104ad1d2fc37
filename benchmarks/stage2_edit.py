"""Stage 2's claim at small scale: stage 1+2 (edit corruption added) against stage 1 only, the same
budget, several seeds.

    python benchmarks/stage2_edit.py --seeds 0 1 2 --steps 30 --out benchmarks/results/stage2/stage2_edit.json

Both arms continue the same stage-1 model (`--start`, default `recipes/tiny/stage2_edit.yaml`'s init_from)
for `--steps` steps on the same data, through `onpolicy train`: `diffusion.edit_fraction=1` (stage 2:
edits under the masks, loss on every position of an edited row) or `=0` (stage 1: masks only). More
arms (variants of stage 2) are named with `--arm NAME=key=value,key=value` (recipe overrides), e.g.
`--arm gentle=diffusion.edit_fraction=1,train.lr=1e-4`. Each trained model, and the starting model, is
then measured on:

1. repair tasks (`repair:heldout`, greedy, one token per step): pass@1 and the exact-repair rate (the
   completion's code equals the reference body, whitespace-normalised);
2. edit-corrupted held-out code: each held-out reference program with 10% of its body tokens edited
   (`edit_tokens`), one forward with the clean past (the training layout); how many corrupted body
   positions the argmax restores, and the share of programs restored exactly;
3. generation on `generated:heldout` (greedy, one token per step) with and without the sampler's
   self-correction (`remask_threshold`): pass@1 and how many tokens self-correction re-opened.

Means over seeds with the seeds' spread, and 95% Wilson intervals pooled over seeds' samples.

Re-running with the same `--out` and `--runs` reuses what they hold (a measurement, a trained arm) only
if it was made the same way: the start, the arm's overrides, `--set`, the seed, `--steps` (and for a
measurement `--limit` and `--remask`); anything else stops with the difference named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "recipes/tiny/stage2_edit.yaml"


ARMS = {"stage1": ["diffusion.edit_fraction=0"], "stage2": ["diffusion.edit_fraction=1"]}


def parse_arm(text: str) -> tuple[str, list[str]]:
    """`NAME=key=value,key=value` -> (NAME, [key=value, ...])."""
    name, sep, overrides = text.partition("=")
    if not sep or not name or "=" not in overrides:
        raise argparse.ArgumentTypeError(f"--arm wants NAME=key=value[,key=value...], got {text!r}")
    return name, overrides.split(",")


def made_with(stored: dict | None, key: dict, what: str) -> bool:
    """Whether `stored` (the key something was made with, None for a result from before keys were kept) is
    `key`; a different one is a clear error, not a silent reuse of another experiment's numbers."""
    if stored is None or stored == key:
        return True
    diff = {k: (stored.get(k), v) for k, v in key.items() if stored.get(k) != v}
    raise SystemExit(f"{what} was made with other settings (stored, now): {diff}; use another --out and "
                     "--runs")


def train_arm(overrides: list[str], seed: int, steps: int, start: Path, out: Path, common: list[str]) -> Path:
    key = {"start": str(start), "overrides": list(overrides), "set": list(common), "seed": seed,
           "steps": steps}
    stamp = out / "stage2_edit_key.json"
    if (out / "final" / "config.json").is_file():
        made_with(json.loads(stamp.read_text()) if stamp.is_file() else None, key, str(out))
        return out / "final"
    cmd = [sys.executable, "-m", "onpolicy.cli", "train", RECIPE, f"model.init_from={start}", *common,
           *overrides, f"train.seed={seed}", f"train.max_steps={steps}", f"train.save_every={steps}",
           f"train.eval_every={steps}", f"logging.output_dir={out}", "logging.progress=false"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    stamp.write_text(json.dumps(key))
    return out / "final"


def normalise(code: str) -> str:
    return "\n".join(line.rstrip() for line in code.strip().splitlines() if line.strip())


def denoise_edits(model, tokenizer, tasks, seed: int, rate: float = 0.1) -> dict:
    """Edit-corrupt each reference body, one BD3 forward with the clean past: restored positions."""
    from onpolicy.diffusion.corruption import edit_tokens
    from onpolicy.tokenizer import SpecialTokens
    from onpolicy.trainers.pretrain import ordinary_tokens

    special = SpecialTokens.from_tokenizer(tokenizer)
    ordinary = ordinary_tokens(tokenizer, special)
    g = torch.Generator().manual_seed(seed)
    fixed = changed = exact = 0
    with torch.no_grad():
        for task in tasks:
            prompt = tokenizer(task.prompt, add_special_tokens=False)["input_ids"]
            body = tokenizer(task.canonical_solution, add_special_tokens=False)["input_ids"] + [special.eos]
            x0 = torch.tensor([prompt + body])
            k = torch.tensor([max(1, int(len(body) * rate))])
            noisy_body = edit_tokens(x0[:, len(prompt):], k, ordinary, special.mask, g).x_t
            x_t = torch.cat([x0[:, : len(prompt)], noisy_body], 1)
            logits = model(input_ids=x_t, clean_input_ids=x0).logits[0, len(prompt):]
            pred, target, seen = logits.argmax(-1), x0[0, len(prompt):], noisy_body[0]
            wrong = seen != target
            changed += int(wrong.sum())
            fixed += int((wrong & (pred == target)).sum())
            exact += int(torch.equal(pred, target))
    return {"corrupted_positions": changed, "restored": fixed, "restored_rate": fixed / max(1, changed),
            "programs": len(tasks), "exact_programs": exact, "exact_rate": exact / len(tasks)}


def measure(folder: Path, args, seed: int) -> dict:
    from onpolicy.data.tasks import load_task_set
    from onpolicy.evaluation import evaluate_checkpoint
    from onpolicy.loading import load_model
    from onpolicy.sampling import SamplerConfig
    from verifiers import PythonTestVerifier

    model, tokenizer = load_model(str(folder))
    model.eval()
    out = {}
    repair = load_task_set("repair:heldout", args.limit, 0)
    gen = load_task_set("generated:heldout", args.limit, 0)
    plain = SamplerConfig(max_new_tokens=96)
    with PythonTestVerifier() as verifier:
        r = evaluate_checkpoint(model, tokenizer, repair, plain, 1, verifier, 8, seed)
        refs = {t.task_id: normalise(t.canonical_solution) for t in repair}
        exact = sum(normalise(s["completion"]) == refs[s["task_id"]] for s in r["samples_detail"])
        out["repair"] = {"pass@1": r["pass@1"], "n": len(repair),
                         "exact_repair": exact / len(repair), "exact_count": exact}
        for name, cfg in (("generate", plain),
                          ("generate_selfcorrect",
                           SamplerConfig(max_new_tokens=96, remask_threshold=args.remask))):
            g = evaluate_checkpoint(model, tokenizer, gen, cfg, 1, verifier, 8, seed)
            out[name] = {"pass@1": g["pass@1"], "n": len(gen), "tokens_per_forward": g["tokens_per_forward"],
                         "remasked": g["remasked"]}
    out["denoise"] = denoise_edits(model, tokenizer, gen, seed)
    return out


def summarise(results: dict, arms: list[str]) -> dict:
    from onpolicy.evaluation import wilson_interval

    keys = [("repair", "pass@1"), ("repair", "exact_repair"), ("denoise", "restored_rate"),
            ("denoise", "exact_rate"), ("generate", "pass@1"), ("generate_selfcorrect", "pass@1")]
    table = {}
    for arm in arms:
        runs = [v for k, v in results.items() if k.rpartition("-s")[0] == arm]
        row = {}
        for section, key in keys:
            vals = [r[section][key] for r in runs]
            row[f"{section}/{key}"] = {"mean": statistics.mean(vals), "seeds": vals,
                                       "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0}
            if key in ("pass@1", "exact_repair"):
                n = sum(r[section]["n"] for r in runs)
                passed = round(sum(v * r[section]["n"] for v, r in zip(vals, runs)))
                row[f"{section}/{key}"]["ci95_pooled"] = wilson_interval(passed, n)
        table[arm] = row
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--limit", type=int, default=150, help="tasks per measurement")
    p.add_argument("--remask", type=float, default=0.3,
                   help="self-correction: re-open a token below this probability")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "stage2-bench")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stage2_edit.json")
    p.add_argument("--start", help="the stage-1 model both arms continue (default: the recipe's init_from)")
    p.add_argument("--arm", type=parse_arm, action="append", default=[],
                   help="one more arm: NAME=key=value[,key=value...] (recipe overrides); repeatable")
    p.add_argument("--only", nargs="+", metavar="ARM",
                   help="run these arms only (default: stage1, stage2 and every --arm)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for every arm")
    args = p.parse_args()

    import yaml

    from onpolicy.loading import resolve_model_dir

    start = resolve_model_dir(args.start or yaml.safe_load((ROOT / RECIPE).read_text())["model"]["init_from"])
    arms = defined = {**ARMS, **dict(args.arm)}
    if args.only:
        unknown = sorted(set(args.only) - set(arms))
        if unknown:
            p.error(f"--only {unknown}: no such arm (arms: {sorted(arms)})")
        arms = {name: arms[name] for name in args.only}
    stored = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results, keys = stored.get("per_model", {}), stored.get("keys", {})
    todo = [("start", None)] + [(f"{arm}-s{seed}", (arm, seed)) for seed in args.seeds for arm in arms]
    for name, job in todo:
        key = {"start": str(start), "limit": args.limit, "remask": args.remask}
        if job is not None:
            key.update(overrides=list(arms[job[0]]), set=list(args.set), seed=job[1], steps=args.steps)
        if name in results and made_with(keys.get(name), key, f"{args.out}: {name}"):
            continue
        keys[name] = key
        folder = start if job is None else train_arm(arms[job[0]], job[1], args.steps, start,
                                                     args.runs / name, args.set)
        seed = 0 if job is None else job[1]
        results[name] = measure(folder, args, seed)
        print(name, json.dumps(results[name]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"per_model": results, "keys": keys,
                                        "args": {k: str(v) for k, v in vars(args).items()}, "arms": defined},
                                       indent=1))
    summary = {"start": results["start"], **summarise(results, list(arms))}
    args.out.write_text(json.dumps({"summary": summary, "per_model": results, "keys": keys, "arms": defined,
                                    "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
