"""Training throughput through the DeepSpeed engine vs a bare torch loop, side by side in one run.

    python benchmarks/train_engine.py --out benchmarks/results/engine/engine_cpu.json
    python benchmarks/train_engine.py --zero 0 2 3 train.precision=bf16   # e.g. on a GPU

Same model (same init), same batches, same noise, same AdamW and gradient clipping. Contenders
take turns in short rounds so that machine noise (shared CPUs) hits all of them alike; the ratio
engine / bare is what to read, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onpolicy import engine as eng  # noqa: E402
from onpolicy.config import load_config  # noqa: E402
from onpolicy.trainers.common import (  # noqa: E402
    autocast,
    batch_rows,
    build_model,
    make_scheduler,
    noise_generator,
    prepare_data,
)
from onpolicy.trainers.pretrain import stage1_loss  # noqa: E402


class Bare:
    """The baseline: model, AdamW, clip, LR schedule; nothing else."""

    def __init__(self, model, cfg):
        t = cfg.train
        self.model, self.clip = model, t.grad_clip
        self.opt = eng.make_optimizer(model, t.lr, t.weight_decay, tuple(t.betas))
        self.sched = make_scheduler(self.opt, t)

    def __call__(self, x0, cfg, mask_id, gen, device):
        with autocast(device, cfg.train.precision):
            loss, _ = stage1_loss(self.model, x0, cfg.diffusion, mask_id, gen)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class Engine:
    def __init__(self, engine):
        self.engine = engine

    def __call__(self, x0, cfg, mask_id, gen, device):
        with autocast(device, cfg.train.precision):
            loss, _ = stage1_loss(self.engine, x0, cfg.diffusion, mask_id, gen)
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()


def build_contenders(cfg, special, device, zero_stages: list[int]) -> dict:
    """The bare loop and one DeepSpeed engine per ZeRO stage, each from the same seeded initial model."""
    t = cfg.train
    torch.manual_seed(t.seed)
    contenders = {"bare_torch": Bare(build_model(cfg, special).to(device), cfg)}
    for stage in zero_stages:
        ds_config = eng.deepspeed_config(f"recipes/deepspeed/zero{stage}.json", t.micro_batch_size,
                                         t.grad_accum, 1, t.grad_clip, t.precision)
        torch.manual_seed(t.seed)
        model = build_model(cfg, special)
        optimizer = eng.make_optimizer(model, t.lr, t.weight_decay, tuple(t.betas))
        engine = eng.initialize(model, optimizer, make_scheduler(optimizer, t), ds_config)
        contenders[f"deepspeed_zero{stage}"] = Engine(engine)
    return contenders


def time_contenders(contenders: dict, corpus, cfg, special, device, args, tokens_per_step: int):
    """Interleaved rounds of the same steps for every contender (a warm-up round first, untimed):
    each one's step times and losses."""
    t = cfg.train
    times: dict[str, list[float]] = {name: [] for name in contenders}
    losses: dict[str, list[float]] = {name: [] for name in contenders}
    step_of = {name: 0 for name in contenders}
    for r in range(-1, args.rounds):  # round -1: warm-up, untimed
        n = args.warmup if r < 0 else args.steps_per_round
        for name, run in contenders.items():
            for _ in range(n):
                s = step_of[name]
                x0 = corpus.train[batch_rows(s, 0, 0, 1, t.micro_batch_size, 1, corpus.train.shape[0],
                                             t.seed)].to(device)
                gen = noise_generator(t.seed, s, 0, 0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                tic = time.perf_counter()
                loss = run(x0, cfg, special.mask, gen, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if r >= 0:
                    times[name].append(time.perf_counter() - tic)
                losses[name].append(loss)
                step_of[name] += 1
        print(f"round {r + 1}/{args.rounds}",
              {k: f"{tokens_per_step / statistics.mean(v):,.0f} tok/s" for k, v in times.items() if v},
              flush=True)
    return times, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/tiny/stage1_mask.yaml")
    ap.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2],
                    help="ZeRO stages to compare with the bare loop")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per contender")
    ap.add_argument("--out", default="benchmarks/results/engine.json")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = ap.parse_args()

    cfg = load_config(args.recipe, args.overrides)
    t = cfg.train
    dist = eng.setup_distributed(cfg.data.cache_dir, t.threads)
    _, corpus, special = prepare_data(cfg, dist.local_rank == 0)

    contenders = build_contenders(cfg, special, dist.device, args.zero)
    tokens_per_step = t.micro_batch_size * cfg.data.seq_len
    total = args.warmup + args.rounds * args.steps_per_round
    times, losses = time_contenders(contenders, corpus, cfg, special, dist.device, args, tokens_per_step)

    base = tokens_per_step * len(times["bare_torch"]) / sum(times["bare_torch"])
    results = {}
    for name, ts in times.items():
        tps = tokens_per_step * len(ts) / sum(ts)
        results[name] = {
            "tokens_per_s": round(tps, 1),
            "ratio_vs_bare": round(tps / base, 3),
            "median_step_s": round(statistics.median(ts), 4),
            "losses": [round(x, 4) for x in losses[name]],
        }
    report = {
        "benchmark": "train_engine",
        "command": "python " + " ".join(sys.argv),
        "recipe": args.recipe,
        "overrides": args.overrides,
        "params": sum(p.numel() for p in contenders["bare_torch"].model.parameters()),
        "tokens_per_step": tokens_per_step,
        "timed_steps_each": args.rounds * args.steps_per_round,
        "total_steps_each": total,
        "precision": t.precision,
        "device": str(dist.device) if dist.device.type == "cpu" else torch.cuda.get_device_name(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "deepspeed": __import__("deepspeed").__version__},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    for name, res in results.items():
        print(f"{name:>18}: {res['tokens_per_s']:>10,.0f} tokens/s   x{res['ratio_vs_bare']:.3f} of bare "
              "torch")
    eng.shutdown()


if __name__ == "__main__":
    main()
