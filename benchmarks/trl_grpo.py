"""TRL's GRPOTrainer on our same-size AR model, with our sandboxed verifier as its reward: the side-by-side
for stage 4's step time and pass@1 gained per CPU-minute.

    python benchmarks/trl_grpo.py --ar runs/tiny-tasks-ar --steps 10 --out
    benchmarks/results/trl/trl_grpo_cpu.json python benchmarks/trl_grpo.py --ar runs/tiny-tasks-ar-300/final
    --steps 20 --threads 1 --eval-limit 300 \
        --ours runs/stage4-ablation/jump --out benchmarks/results/trl/trl_grpo_vs_ours_cpu.json

The AR checkpoint becomes a transformers Llama with the same weights (`onpolicy.convert.to_llama`,
logits equal, tested). Same prompts as stage 4 (generated train tasks, token-healed as our sampler
sees them), the same group size, completion length, learning rate and sampling temperature as
recipes/tiny/stage4_onpolicy.yaml; the reward is `verifiers.trl.as_reward_function` over
`PythonTestVerifier`, with the completion cut as `onpolicy eval` cuts it. pass@1 before and after on
held-out generated tasks through `onpolicy eval`'s path (greedy). With `--ours RUN`, the same for a
stage-4 run: its start (`model.init_from`) and its `final/` at one token per step, its seconds the
sum of its steps' rollout, verify and training time. "Per CPU-minute" counts seconds x torch threads.

Needs `pip install -e .[trl]`. Run 2026-11-29 with --steps 3 (results in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from onpolicy.metrics import step_seconds


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ar", required=True)
    p.add_argument("--recipe", default="recipes/tiny/stage4_onpolicy.yaml",
                   help="stage-4 recipe whose settings TRL copies")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eval-limit", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--ours", default=None, help="a stage-4 run folder to set beside TRL")
    p.add_argument("--work", default="runs/trl-grpo")
    p.add_argument("--out", default="benchmarks/results/trl/trl_grpo_cpu.json")
    return p.parse_args()


def train_grpo(cfg, llama, tokenizer, work: Path, steps: int):
    """TRL's GRPOTrainer on the recipe's prompts, rewarded by our verifier through `verifiers.trl`: the
    trainer after `steps` steps and the seconds they took."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from onpolicy.data.tasks import encode_prompt, load_task_set, truncate_completion
    from verifiers import PythonTestVerifier
    from verifiers.trl import as_reward_function

    r = cfg.rollout
    tasks = load_task_set(r.tasks, r.n_tasks, cfg.train.seed)
    encoded = [encode_prompt(tokenizer, t.prompt) for t in tasks]
    data = Dataset.from_dict({"prompt": [tokenizer.decode(ids) for ids, _ in encoded],
                              "task_id": [t.task_id for t in tasks], "held_back": [h for _, h in encoded]})
    with PythonTestVerifier() as verifier:
        scored = as_reward_function(verifier, {t.task_id: t for t in tasks})

        def reward(prompts, completions, completion_ids=None, **columns):
            cut = [truncate_completion(c.removeprefix(h)) for c, h in zip(completions, columns["held_back"])]
            return scored(prompts, cut, completion_ids, **columns)

        trl_cfg = GRPOConfig(output_dir=str(work / "trainer"), use_cpu=True, max_steps=steps,
                             learning_rate=cfg.train.lr,
                             per_device_train_batch_size=r.prompts_per_step * r.group_size,
                             num_generations=r.group_size, max_completion_length=r.sampler.max_new_tokens,
                             temperature=r.sampler.temperature, beta=0.0, logging_steps=1, report_to=[],
                             save_strategy="no", seed=cfg.train.seed, bf16=False)
        trainer = GRPOTrainer(model=llama, reward_funcs=[reward], args=trl_cfg, train_dataset=data,
                              processing_class=tokenizer)
        tic = time.perf_counter()
        trainer.train()
        return trainer, time.perf_counter() - tic


def main() -> int:
    from onpolicy.config import load_config
    from onpolicy.convert import to_llama
    from onpolicy.data.tasks import load_task_set
    from onpolicy.evaluation import evaluate_checkpoint
    from onpolicy.loading import load_model, load_pretrained
    from onpolicy.sampling import SamplerConfig
    from verifiers import PythonTestVerifier

    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe, [f"model.init_from={args.ar}"])
    r = cfg.rollout
    model, tokenizer = load_pretrained(args.ar)
    llama = to_llama(model)
    work = Path(args.work)
    start = work / "start"
    llama.save_pretrained(start)
    tokenizer.save_pretrained(start)

    heldout = load_task_set("generated:heldout", args.eval_limit)
    greedy = SamplerConfig(max_new_tokens=r.sampler.max_new_tokens)

    def pass_at_1(folder):
        m, tok = load_model(folder)
        with PythonTestVerifier() as v:
            return evaluate_checkpoint(m, tok, heldout, greedy, samples=1, verifier=v, batch_size=32)

    before = pass_at_1(start)
    trainer, seconds = train_grpo(cfg, llama, tokenizer, work, args.steps)
    after_dir = work / "after"
    trainer.model.save_pretrained(after_dir)
    tokenizer.save_pretrained(after_dir)
    after = pass_at_1(after_dir)
    report = {
        "benchmark": "TRL GRPOTrainer on the AR model, our verifier as reward", "ar": args.ar,
        "steps": args.steps, "seconds": seconds, "seconds_per_step": seconds / args.steps,
        "threads": torch.get_num_threads(),
        "settings": {"prompts_per_step": r.prompts_per_step, "group_size": r.group_size,
                     "max_completion_length": r.sampler.max_new_tokens, "lr": cfg.train.lr,
                     "temperature": r.sampler.temperature},
        "pass@1_before": before["pass@1"], "pass@1_before_ci95": before["pass@1_ci95"],
        "pass@1_after": after["pass@1"], "pass@1_after_ci95": after["pass@1_ci95"],
        "pass@1_gained_per_cpu_minute": per_cpu_minute(after["pass@1"] - before["pass@1"], seconds,
                                                       torch.get_num_threads()),
        "log": trainer.state.log_history,
    }
    if args.ours:
        report["ours"] = stage4_side(Path(args.ours), pass_at_1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"TRL GRPO: {report['seconds_per_step']:.1f} s/step; held-out pass@1 {before['pass@1']:.3f} -> "
          f"{after['pass@1']:.3f}")
    if args.ours:
        o = report["ours"]
        print(f"ours: {o['seconds_per_step']:.1f} s/step; held-out pass@1 {o['pass@1_before']:.3f} -> "
              f"{o['pass@1_after']:.3f}")
    return 0


def stage4_side(run: Path, pass_at_1) -> dict:
    """Our stage-4 run beside TRL's: seconds per step from its metrics, held-out pass@1 of its start and
    its final model (one token per step, greedy), gain per CPU-minute (seconds x its torch threads)."""
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "time/rollout" in m]
    seconds = sum(step_seconds(m) for m in steps)
    threads = cfg["train"]["threads"] or torch.get_num_threads()
    before, after = pass_at_1(cfg["model"]["init_from"]), pass_at_1(str(run / "final"))
    return {"run": str(run), "steps": len(steps), "seconds": seconds,
            "seconds_per_step": seconds / max(1, len(steps)), "threads": threads,
            "pass@1_before": before["pass@1"], "pass@1_before_ci95": before["pass@1_ci95"],
            "pass@1_after": after["pass@1"], "pass@1_after_ci95": after["pass@1_ci95"],
            "pass@1_gained_per_cpu_minute": per_cpu_minute(after["pass@1"] - before["pass@1"], seconds,
                                                           threads)}


def per_cpu_minute(gain: float, seconds: float, threads: int) -> float:
    return gain / (seconds * threads / 60)


if __name__ == "__main__":
    raise SystemExit(main())
