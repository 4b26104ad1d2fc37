"""Training throughput of the block-diffusion layout against AR on the same model, in one run.

    python benchmarks/train_layout.py --out benchmarks/results/train_layout/train_layout_cpu.json

Contenders, taking turns step by step on the same batches (16 x 256 tokens of the tiny recipe's shape,
5.9M parameters, fwd + bwd + AdamW): AR (causal, next-token loss); stage 1 at block 8 as before
2026-12-07 ("full head": the head on all 2L tokens of the noisy + clean layout, the shift made on
[B, L, V] logits, the loss gathering its masked positions from them); and stage 1 now ("head at the
masked positions": `logits_at`, the shift made on hidden states, the head and the loss on the masked
positions only). Both stage-1 contenders see the same noise: their losses on one batch after training
alike are reported (the change is speed only). Tokens/s counts the clean sequence's tokens (B x L),
so the BD3 layout (noisy + clean copy, 2L) reads at most ~0.5x AR. A torch.profiler table of one step
of each is written beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from onpolicy.config import DiffusionConfig
from onpolicy.diffusion.corruption import mask_tokens
from onpolicy.diffusion.losses import masked_diffusion_loss
from onpolicy.diffusion.schedules import elbo_weight, mask_rate, sample_times
from onpolicy.model import DiffusionTransformer, DiffusionTransformerConfig
from onpolicy.trainers.pretrain import stage1_loss


def model(attention: str, block: int, seed: int = 0) -> DiffusionTransformer:
    torch.manual_seed(seed)
    cfg = DiffusionTransformerConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=6,
                                     num_attention_heads=4, attention=attention, block_size=block,
                                     mask_token_id=3, shift_logits=attention != "causal")
    return DiffusionTransformer(cfg).train()


def full_head_loss(model, x0, diff, mask_id, generator):
    """Stage 1's loss as computed before 2026-12-07: full [B, L, V] logits (the head on every token of the
    noisy + clean layout), the masked positions gathered by the loss. The same noise draws as stage1_loss."""
    t = sample_times(x0.shape[0], diff.t_sampling, diff.t_eps, generator)
    x_t, masked = mask_tokens(x0, mask_rate(t, diff.schedule), mask_id, generator=generator)
    logits = model(input_ids=x_t, clean_input_ids=x0).logits
    return masked_diffusion_loss(logits, x0, masked, elbo_weight(t, diff.schedule))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per contender")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/train_layout/train_layout_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    diff = DiffusionConfig()
    before, now = "stage1 (full head, before)", "stage1 (head at masked positions, now)"
    contenders = {"ar": model("causal", 1), before: model("block_causal", args.block),
                  now: model("block_causal", args.block)}
    losses_of = {"ar": stage1_loss, before: full_head_loss, now: stage1_loss}
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in contenders.items()}
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, 2048, (args.batch, args.seq_len), generator=g) for _ in range(args.steps + 2)]

    def step(name: str, x0: torch.Tensor, seed: int) -> float:
        tic = time.perf_counter()
        loss, _ = losses_of[name](contenders[name], x0, diff, 3, torch.Generator().manual_seed(seed))
        loss.backward()
        optims[name].step()
        optims[name].zero_grad(set_to_none=True)
        return time.perf_counter() - tic

    times: dict[str, list[float]] = {k: [] for k in contenders}
    losses = {}
    for i, x0 in enumerate(batches):
        for name in contenders:
            seconds = step(name, x0, i)
            if i >= 2:  # two untimed warm-up steps
                times[name].append(seconds)
    for name in (before, now):  # trained alike: the change is speed only
        with torch.no_grad():
            losses[name] = float(losses_of[name](contenders[name], batches[0], diff, 3,
                                                 torch.Generator().manual_seed(123))[0])
    losses["abs_difference"] = abs(losses[before] - losses[now])
    tokens = args.batch * args.seq_len
    result = {name: {"median_step_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t)}
              for name, t in times.items()}
    for r in result.values():
        r["vs_ar"] = r["tokens_per_s"] / result["ar"]["tokens_per_s"]
    profiles = {}
    from torch.profiler import ProfilerActivity, profile

    for name in contenders:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(name, batches[1], 1)
        profiles[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    report = {"benchmark": "train_layout", "batch": args.batch, "seq_len": args.seq_len, "block": args.block,
              "steps": args.steps, "machine": {"platform": platform.platform(),
                                               "threads": torch.get_num_threads(),
                                               "torch": torch.__version__},
              "results": result, "loss_same_batch": losses}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".profile.txt").write_text("\n\n".join(f"== {k}\n{v}" for k, v in profiles.items()))
    for name, r in result.items():
        print(f"{name:<26} {r['tokens_per_s']:8.0f} tokens/s  {r['vs_ar']:.2f}x AR  (median step "
              f"{r['median_step_s']:.3f} s)")
    print(f"wrote {out} and {out.with_suffix('.profile.txt')}")


if __name__ == "__main__":
    main()
