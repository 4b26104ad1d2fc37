"""How many held-out generated tasks compute the same function as a train task ("twins").

    python benchmarks/split_twins.py --heldout 300 --train 40000 --out benchmarks/results/split/twins.json

A task's function is read off its reference solution's outputs on `--inputs` fresh seeded lists,
drawn independently of the generator's own behaviour probes (`onpolicy.data.generated.PROBES`), so the
count checks the split rather than restating its rule. `--generator FILE` counts the twins of another
version of `onpolicy/data/generated.py` (e.g. `git show 4913a68:onpolicy/data/generated.py > old.py`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path


def fresh_inputs(n: int, seed: int = 12345) -> list[list[int]]:
    rng = random.Random(f"split-twins:{seed}")
    return [[rng.randint(-30, 100) for _ in range(rng.randint(0, 15))] for _ in range(n)]


def outputs(task, inputs: list[list[int]]) -> tuple:
    namespace: dict = {}
    exec(task.prompt + task.canonical_solution, namespace)  # our own generated reference code
    fn, out = namespace[task.entry_point], []
    for xs in inputs:
        try:
            out.append(repr(fn(list(xs))))
        except Exception as e:
            out.append(type(e).__name__)
    return tuple(out)


def count_twins(generate, n_heldout: int, n_train: int, inputs: list[list[int]], seed: int = 0) -> dict:
    train = {outputs(t, inputs) for t in generate("train", n_train, seed=seed)}
    heldout = generate("heldout", n_heldout, seed=seed)
    twins = [t.task_id for t in heldout if outputs(t, inputs) in train]
    return {"heldout": n_heldout, "train": n_train, "inputs": len(inputs), "twins": len(twins),
            "twin_ids": twins[:20]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--train", type=int, default=40000)
    ap.add_argument("--inputs", type=int, default=88)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generator", default=None, help="another version of onpolicy/data/generated.py")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.generator:
        spec = importlib.util.spec_from_file_location("generated_other", args.generator)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        generate = module.generate_tasks
    else:
        from onpolicy.data.generated import generate_tasks as generate
    result = count_twins(generate, args.heldout, args.train, fresh_inputs(args.inputs), args.seed)
    result["generator"] = args.generator or "onpolicy/data/generated.py"
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
