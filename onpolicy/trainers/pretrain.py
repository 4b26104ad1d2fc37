"""Stage 1: masked-diffusion pre-training (docs/method.md, stage 1), and the same-size AR baseline.

    onpolicy train recipes/tiny/stage1_mask.yaml                 # one process
    onpolicy train recipes/tiny/stage1_mask.yaml --nproc 2       # two ranks (torchrun, gloo on CPU)
    deepspeed --num_gpus 8 --module onpolicy.cli train recipes/gpu/stage1_mask_100m.yaml

The objective follows `model.attention`: bidirectional and block_causal models train the
masked-diffusion ELBO (block_causal with the clean sequence appended, BD3-LM style, so inference can
use an exact KV cache); a causal model trains next-token prediction, the AR baseline.

Stage 2 (docs/method.md, stage 2) is an option of this loop, not a copy: the last `diffusion.edit_fraction`
of the steps add edit corruption (substitutions, deletions, insertions) and count every position of
an edited row; `recipes/tiny/stage2_edit.yaml` continues a stage-1 model with edits on a quarter of the rows
of every step.

Every run is resumable and exactly reproducible: the data order and the noise of step s are pure
functions of (seed, s, the micro-batch's place in the global batch), so a resumed run sees the same
batches and masks, with any number of processes.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from onpolicy import checkpoint as ckpt
from onpolicy import engine as eng
from onpolicy.config import DiffusionConfig, PretrainConfig
from onpolicy.diffusion.corruption import edit_tokens, mask_tokens
from onpolicy.diffusion.losses import causal_lm_loss, edit_diffusion_loss, masked_diffusion_loss
from onpolicy.diffusion.schedules import elbo_weight, mask_rate, sample_times
from onpolicy.metrics import MetricsLogger
from onpolicy.tokenizer import SpecialTokens
from onpolicy.trainers.common import (
    autocast,
    batch_rows,
    build_model,
    export,
    make_engine,
    model_hidden_size,
    noise_generator,
    open_run,
    plan_resume,
    prepare_data,
    resume,
    resumed_grad_accum,
    unwrap,
    write_summary,
)


def stage1_loss(
    model, x0: torch.Tensor, diff: DiffusionConfig, mask_id: int, generator: torch.Generator,
    ordinary: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The pre-training loss of a batch of clean sequences x0 [B, L], for any attention mode (causal
    models: next-token prediction; the others: the masked-diffusion ELBO). With `ordinary` (the [V]
    tokens an edit may write) the batch is a stage-2 batch: edit corruption is added (stacked under
    the masks, or on a share of the rows: `diffusion.edit_mode`) and edited rows count every position."""
    attention = unwrap(model).config.attention
    if attention == "causal":
        return causal_lm_loss(model(input_ids=x0).logits, x0)
    t = sample_times(x0.shape[0], diff.t_sampling, diff.t_eps, generator)  # [B]
    edit = ordinary is not None
    if edit:
        edited = torch.ones(x0.shape[0], dtype=torch.bool) if diff.edit_mode == "stack" else \
            torch.rand(x0.shape[0], generator=generator) < diff.edit_share  # [B]
        k = torch.floor(x0.shape[1] * diff.edit_alpha_max * t).long() * edited  # [B] edits per row
        x_noisy = edit_tokens(x0, k, ordinary, mask_id, generator).x_t
        maskable = None if diff.edit_mode == "stack" else ~edited[:, None].expand_as(x0).to(x0.device)
        x_t, masked = mask_tokens(x_noisy, mask_rate(t, diff.schedule), mask_id, maskable=maskable,
                                  generator=generator)
    else:
        x_t, masked = mask_tokens(x0, mask_rate(t, diff.schedule), mask_id, generator=generator)  # [B, L]
    clean = {"clean_input_ids": x0} if attention == "block_causal" else {}  # BD3-LM: noisy blocks read clean
    # ones
    weight = elbo_weight(t, diff.schedule).to(x0.device)
    if edit:
        logits = model(input_ids=x_t, **clean).logits
        return edit_diffusion_loss(logits, x0, masked, weight, edited.to(logits.device))
    logits = model(input_ids=x_t, logits_at=masked, **clean).logits  # [M, V]: the head where the loss reads
    return masked_diffusion_loss(logits, x0, masked, weight)


def ordinary_tokens(tokenizer, special: SpecialTokens) -> torch.Tensor:
    """[V] bool: the tokens an edit may write (every special token excluded: mask, pad, EOS, ...)."""
    ordinary = torch.ones(special.vocab_size, dtype=torch.bool)
    ordinary[[special.pad, special.bos, special.eos, special.mask, special.sep,
              *tokenizer.all_special_ids]] = False
    return ordinary


def edit_start(diff: DiffusionConfig, max_steps: int) -> int:
    """The first step with edit corruption: the last `edit_fraction` of the run (stage 2)."""
    return max_steps - round(diff.edit_fraction * max_steps) if diff.edit_fraction > 0 else max_steps + 1


@torch.no_grad()
def evaluate(model, val: torch.Tensor, cfg: PretrainConfig, special: SpecialTokens,
             device: torch.device) -> float:
    """Validation loss with fixed noise (the same t and masks every time), so curves are comparable."""
    model.eval()
    total, bs = 0.0, cfg.train.micro_batch_size
    n_batches = min(cfg.train.eval_batches, max(1, val.shape[0] // bs))
    for i in range(n_batches):
        x0 = val[i * bs : (i + 1) * bs].to(device)
        with autocast(device, cfg.train.precision):
            loss, _ = stage1_loss(model, x0, cfg.diffusion, special.mask,
                                  noise_generator(cfg.train.seed, -2, i))
        total += loss.item()
    model.train()
    return total / n_batches


def one_step(engine, seq: torch.Tensor, step: int, grad_accum: int, cfg: PretrainConfig, special, dist,
             edit: torch.Tensor | None) -> tuple[list[torch.Tensor], dict]:
    """One optimizer step over `grad_accum` micro-batches of this rank's rows; (their losses, the last stats).
    edit: the tokens edit corruption may substitute (stage 2), or None."""
    t, losses = cfg.train, []
    for micro in range(grad_accum):
        rows = batch_rows(step, micro, dist.rank, dist.world_size, t.micro_batch_size, grad_accum,
                          seq.shape[0], t.seed)
        x0 = seq[rows].to(dist.device)
        # noise keyed by the micro-batch's place in the global batch: the same rows get the same
        # noise whatever the number of processes (a resumed run with another world size goes on alike)
        noise = noise_generator(t.seed, step, micro * dist.world_size + dist.rank, 0)
        with autocast(dist.device, t.precision):
            loss, stats = stage1_loss(engine, x0, cfg.diffusion, special.mask, noise, edit)
        engine.backward(loss)
        eng.step(engine)
        losses.append(loss.detach())
    return losses, stats


def log_window(log: MetricsLogger, step: int, engine, scheduler, losses: list[torch.Tensor], stats: dict,
               tokens_per_s: float) -> None:
    """The metrics of the steps since the last log line (loss averaged over them and over ranks)."""
    metrics = {"train/loss": eng.mean_over_ranks(torch.stack(losses).mean()).item(),
               **{f"train/{k}": v for k, v in stats.items()}, "train/lr": scheduler.get_last_lr()[0],
               "train/grad_norm": eng.grad_norm(engine), "perf/tokens_per_s": tokens_per_s}
    log.log(step, metrics)
    log.progress(step, {"loss": f"{metrics['train/loss']:.3f}", "tok/s": f"{tokens_per_s:,.0f}"})


def train(cfg: PretrainConfig) -> dict:
    """Run stage 1 to `train.max_steps`; returns the run summary (also written to summary.json)."""
    out = Path(cfg.logging.output_dir)
    dist = eng.setup_distributed(cfg.data.cache_dir, cfg.train.threads)
    torch.manual_seed(cfg.train.seed)  # model init only; data and noise use their own generators

    # 1. Tokenizer and corpus (rank 0 builds and caches them first).
    tokenizer, corpus, special = prepare_data(cfg, dist.local_rank == 0)

    # 2. Model and DeepSpeed engine. A checkpoint saved by another number of processes resumes through
    #    DeepSpeed's universal checkpoint, with the same global batch (gradient accumulation adapts).
    t = cfg.train
    plan = plan_resume(out, t.resume, dist.world_size)
    grad_accum = resumed_grad_accum(plan, t.micro_batch_size, t.grad_accum, dist.world_size)
    ds_config = plan.apply(eng.deepspeed_config(t.deepspeed, t.micro_batch_size, grad_accum, dist.world_size,
                                                t.grad_clip, t.precision, model_hidden_size(cfg.model)))
    model = build_model(cfg, special)
    engine, scheduler = make_engine(cfg, model, ds_config)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())

    # 3. Resume from the newest complete checkpoint; the run folder and its log.
    state = resume(engine, plan, dist)
    step, history = state.get("step", 0), state.get("val_history", [])
    log = open_run(out, cfg, engine, tokenizer, step, dist)
    log.write(f"[onpolicy] {n_params / 1e6:.2f}M params, attention={cfg.model.attention}, "
              f"ZeRO-{eng.zero_stage(ds_config)}, world={dist.world_size}, device={dist.device}, "
              f"corpus {corpus.meta['train_tokens']:,} train / {corpus.meta['val_tokens']:,} val tokens"
              + plan.describe(step, grad_accum))
    if not history:
        history.append({"step": step, "val_loss": evaluate(engine, corpus.val, cfg, special, dist.device)})
        log.log(step, {"val/loss": history[-1]["val_loss"]})

    # 4. The loop: forward, backward, step; evaluate and checkpoint on schedule. The last
    #    `diffusion.edit_fraction` of the steps are stage 2 (edit corruption added).
    global_batch = t.micro_batch_size * grad_accum * dist.world_size
    causal = cfg.model.attention == "causal"
    first_edit_step = t.max_steps + 1 if causal else edit_start(cfg.diffusion, t.max_steps)
    ordinary = ordinary_tokens(tokenizer, special)
    if first_edit_step < t.max_steps:
        log.write(f"[onpolicy] stage 2 (edit corruption, {cfg.diffusion.edit_mode}) from step "
                  f"{first_edit_step + 1} of {t.max_steps}")
    tokens_per_step = global_batch * cfg.data.seq_len
    seq = corpus.train
    engine.train()
    tic, window_tokens, loss_acc = time.perf_counter(), 0, []
    stop = min(t.max_steps, t.stop_at_step or t.max_steps)
    while step < stop:
        # stage 2: the last edit_fraction of the run adds edit corruption
        edit_tokens = ordinary if step >= first_edit_step else None
        losses, stats = one_step(engine, seq, step, grad_accum, cfg, special, dist, edit_tokens)
        loss_acc += losses  # read once per log line, not per micro-batch
        step += 1
        window_tokens += tokens_per_step

        if step % cfg.logging.log_every == 0 or step == stop:
            log_window(log, step, engine, scheduler, loss_acc, stats,
                       window_tokens / (time.perf_counter() - tic))
            tic, window_tokens, loss_acc = time.perf_counter(), 0, []
        if (t.eval_every and step % t.eval_every == 0) or step == stop:
            val_loss = evaluate(engine, corpus.val, cfg, special, dist.device)
            history.append({"step": step, "val_loss": val_loss})
            log.log(step, {"val/loss": history[-1]["val_loss"]})
            log.write(f"[onpolicy] step {step}: val loss {history[-1]['val_loss']:.4f}")
        if (t.save_every and step % t.save_every == 0) or step == stop:
            ckpt.save_checkpoint(engine, out / "checkpoints", step, {"step": step, "val_history": history},
                                 t.keep_checkpoints, dist.is_main, dist.rank, dist.world_size, global_batch)

    # 5. Export the final model as an HF folder with its tokenizer.
    if step == t.max_steps:
        export(engine, tokenizer, out / "final", dist.is_main, cfg)
    summary = {"output_dir": str(out), "final_model": str(out / "final") if step == t.max_steps else None,
               "params": n_params, "steps": step, "val_loss_start": history[0]["val_loss"],
               "val_loss_end": history[-1]["val_loss"], "val_history": history, "corpus": corpus.meta}
    write_summary(out, summary, dist.is_main)
    if dist.is_main:
        log.write(f"[onpolicy] val loss {summary['val_loss_start']:.4f} -> {summary['val_loss_end']:.4f}; "
                  f"model in {out / 'final'}")
    log.close()
    eng.shutdown()
    return summary
