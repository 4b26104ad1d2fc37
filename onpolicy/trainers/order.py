"""Stage 3, constrained-order distillation (docs/method.md, stage 3): the model samples its own generation
trajectories, the best are kept, and it is fine-tuned on the states they went through.

    onpolicy train recipes/tiny/stage3_order.yaml

Top to bottom (`train` below):
  1. the pool: `pool.samples` trajectories of each of `pool.n_tasks` prompts through the one sampler
     (`rollout.decode_tasks`, one token per step by default: the order in which tokens were committed
     is what is distilled), each judged by the verifier and scored by its path log-likelihood; per
     prompt the best `pool.keep` are kept: verified first, then (`pool.prefer`) the fewest forwards
     ("fast": parallel orders that still pass) or the highest path log-likelihood ("likely"). Written to
     `pool.jsonl` (format in `write_pool`) with the model, sampler settings and seeds that made it; a run
     finds it again, and `pool.path` reuses one (from this or another run);
  2. distillation: each step takes a micro-batch of kept trajectories (seeded epochs, resumable) and
     replays their states (`rollout.replay_logprobs`: the state before each step, as the model saw it
     while sampling); the loss is the negative log-likelihood of the tokens committed at each step
     given the state before it, averaged over committed tokens. The same per-step log-likelihood
     (`rollout.committed_logprob`) that stage 4 weights by advantages: one implementation, two callers;
  3. validation (pass@1 and tokens per forward, one token per step and fast) at the start, on a
     schedule and at the end; resumable checkpoints; the final model exported.

The ranking score of a trajectory, stated: the per-token path log-likelihood, (1/|x0|) sum over steps
of log p(tokens committed at the step | the state before it), as the sampler recorded it (temperature
1). It leaves out the probability of the order itself (which positions were unmasked when), so it is
not an evidence lower bound of log p(x0); it is a ranking rule that depends on the order, which is what
choosing among orders of the same program needs (the mask ELBO of x0 alone would not tell them apart).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from onpolicy import checkpoint as ckpt
from onpolicy import engine as eng
from onpolicy.config import OrderConfig
from onpolicy.data.tasks import load_task_set
from onpolicy.errors import ConfigError
from onpolicy.metrics import MetricsLogger
from onpolicy.rollout import VerifierPool, decode_tasks, replay_logprobs
from onpolicy.sampling import TrajectoryRow
from onpolicy.trainers.common import (
    autocast,
    batch_rows,
    build_model,
    describe,
    export,
    flat_validation,
    make_engine,
    model_hidden_size,
    open_run,
    plan_resume,
    resume,
    start_from_model,
    unwrap,
    validate,
    verifier_pool,
    write_summary,
)
from verifiers.tasks import read_jsonl

POOL_FORMAT = "onpolicy-trajectory-pool/1"


def order_loss(token_logp: torch.Tensor, committed: torch.Tensor) -> tuple[torch.Tensor,
                                                                           dict[str, torch.Tensor]]:
    """The distillation loss: -mean log p(token committed at step k | state before step k) over the
    committed positions of a batch of trajectories. token_logp, committed: [B, G]."""
    n = committed.sum().clamp(min=1)
    nll = -(token_logp * committed).sum() / n
    return nll, {"order_nll": nll.detach(), "tokens": n.detach().float()}


def select(rows: list[dict], keep: int, require_pass: bool, prefer: str = "likely") -> list[dict]:
    """The best `keep` trajectories of one prompt: verified ones first, then the fewest forwards
    (prefer="fast", ties by likelihood) or the highest per-token path log-likelihood ("likely")."""
    if prefer == "fast":
        ranked = sorted(rows, key=lambda r: (r["passed"], -r.get("forwards", 0), _score(r)), reverse=True)
    else:
        ranked = sorted(rows, key=lambda r: (r["passed"], _score(r)), reverse=True)
    if require_pass:
        ranked = [r for r in ranked if r["passed"]]
    return ranked[:keep]


def _score(row: dict) -> float:
    return row["path_logp"] if "path_logp" in row else row["elbo"]  # "elbo": pools written before 2026-12-07


def write_pool(path: Path, header: dict, kept: list[dict]) -> None:
    """JSONL: line 1 {"format", "model", "tasks", "sampler", "seed", "samples", "keep", counts...};
    then one kept trajectory per line: {"task_id", "task_index", "sample", "seed", "passed", "status",
    "path_logp" (per-token path log-likelihood; "elbo" in older pools), "forwards", "trajectory":
    TrajectoryRow fields (prompt ids, canvas, commit_forward, commit_logprob, forwards, ...)}. Replaying a
    line with the same model rebuilds every state it went through."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(header) + "\n")
        for row in kept:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def read_pool(path: Path) -> tuple[dict, list[dict]]:
    """The pool file's header and kept rows; a malformed file is named with its line."""
    try:
        numbered = read_jsonl(path)
    except FileNotFoundError:
        raise ConfigError(f"pool file not found: {path}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not numbered or numbered[0][1].get("format") != POOL_FORMAT:
        raise ConfigError(f"{path}:1: not a trajectory pool (expected a header with format {POOL_FORMAT!r})")
    for i, row in numbered[1:]:
        if not {"task_id", "passed", "trajectory"} <= set(row) or not {"path_logp", "elbo"} & set(row):
            raise ConfigError(f"{path}:{i}: a pool row needs task_id, passed, path_logp and trajectory")
    return numbered[0][1], [row for _, row in numbered[1:]]


def build_pool(engine, tokenizer, cfg: OrderConfig, verifier: VerifierPool,
               show: bool) -> tuple[dict, list[dict]]:
    """Sample, verify, score and select (step 1 above)."""
    from tqdm.auto import tqdm

    p, seed = cfg.pool, cfg.train.seed
    tasks = load_task_set(p.tasks, p.n_tasks, seed)
    module = engine.module
    module.eval()
    tic = time.perf_counter()
    with torch.no_grad(), tqdm(total=len(tasks) * p.samples, desc="pool", unit="traj",
                               disable=not show) as bar:
        decoded = decode_tasks(module, tokenizer, tasks, p.sampler, p.samples, seed, p.batch_size,
                               on_batch=verifier.submit, progress=bar.update)
    verdicts = verifier.results()
    module.train()
    by_task: dict[int, list[dict]] = {}
    for ro, v in zip(decoded.rollouts, verdicts):
        if v.status == "excluded":
            continue  # no verdict: neither kept nor counted
        tr = ro.trajectory
        path_logp = float(tr.commit_logprob.sum()) / max(1, int((tr.commit_forward > 0).sum()))
        by_task.setdefault(ro.task_index, []).append(
            {"task_id": ro.task.task_id, "task_index": ro.task_index, "sample": ro.sample, "seed": tr.seed,
             "passed": bool(v.passed), "status": v.status, "path_logp": path_logp,
             "forwards": int(tr.commit_forward.max()), "trajectory": tr.to_json()})
    kept = [row for i in sorted(by_task) for row in select(by_task[i], p.keep, p.require_pass, p.prefer)]
    passed = sum(v.passed for v in verdicts)
    header = {"format": POOL_FORMAT, "model": str(cfg.model.init_from), "tasks": p.tasks,
              "n_tasks": len(tasks), "samples": p.samples, "keep": p.keep, "require_pass": p.require_pass,
              "sampler": asdict(p.sampler), "seed": seed, "verifier": p.verifier,
              "decoded": len(decoded.rollouts), "passed": passed,
              "excluded": sum(v.status == "excluded" for v in verdicts), "kept": len(kept),
              "prompts_with_a_pass": sum(any(r["passed"] for r in rows) for rows in by_task.values()),
              "tokens_per_forward": decoded.tokens_per_forward,
              "seconds": round(time.perf_counter() - tic, 1)}
    return header, kept


def pool_rows(engine, tokenizer, cfg: OrderConfig, verifier, pool_path: Path, dist,
              log: MetricsLogger) -> list[TrajectoryRow]:
    """The kept trajectories: read from `pool_path`, or decoded, verified and written there (rank 0)."""
    if pool_path.is_file():
        header, kept = read_pool(pool_path)
        log.write(f"[onpolicy] pool {pool_path}: {len(kept)} trajectories kept (made by {header['model']})")
    elif cfg.pool.path:
        raise ConfigError(f"pool.path: pool file not found: {pool_path}")
    else:
        header, kept = build_pool(engine, tokenizer, cfg, verifier, dist.is_main and cfg.logging.progress)
        if dist.is_main:
            write_pool(pool_path, header, kept)
        eng.barrier()
        log.write(f"[onpolicy] pool: {header['decoded']} trajectories of {header['n_tasks']} prompts in "
                  f"{header['seconds']} s, "
                  f"{header['passed']} verified ({header['prompts_with_a_pass']} prompts), {header['kept']} "
                  f"kept -> {pool_path}")
    if not kept:
        raise ConfigError(f"{pool_path}: no trajectory was kept (none verified?): nothing to distill. Raise "
                          "pool.n_tasks or "
                          "pool.samples, lower pool.sampler.temperature, or set pool.require_pass=false")
    return [TrajectoryRow.from_json(r["trajectory"]) for r in kept]


def train(cfg: OrderConfig) -> dict:
    """Run stage 3: build (or reuse) the pool, distill it for `train.max_steps`; returns the summary."""
    out, dist, tokenizer, special = start_from_model(cfg)
    t, p = cfg.train, cfg.pool

    # The starting model, the verifier, the engine.
    plan = plan_resume(out, t.resume, dist.world_size)
    ds_config = plan.apply(eng.deepspeed_config(t.deepspeed, t.micro_batch_size, t.grad_accum,
                                                dist.world_size, t.grad_clip, t.precision,
                                                 model_hidden_size(cfg.model)))
    model = build_model(cfg, special, adapt_attention=False)
    if unwrap(model).config.attention == "causal":
        raise ConfigError("stage order distills diffusion trajectories; model.init_from is a causal (AR) "
                          "model")
    engine, scheduler = make_engine(cfg, model, ds_config)
    verifier = verifier_pool(p.verifier, p.strict, p.verifier_timeout, "pool.verifier", p.verifier_args,
                             p.pass_threshold)
    val_tasks = load_task_set(cfg.validation.tasks, cfg.validation.n_tasks, t.seed)
    state = resume(engine, plan, dist)
    step, history = state.get("step", 0), state.get("val_history", [])
    log = open_run(out, cfg, engine, tokenizer, step, dist)
    if not history:
        start = validate(engine, tokenizer, val_tasks, p.sampler, cfg.validation.fast_threshold, p.batch_size,
                         t.seed, verifier)
        history.append({"step": 0, **start})
        log.log(0, flat_validation(start))
        log.write(f"[onpolicy] stage 3 from {cfg.model.init_from}; start: {describe(start)}")

    # 1. The pool: built once (by every rank alike from the same seeds, rank 0 writes it) or reused.
    pool_path = Path(p.path) if p.path else out / "pool.jsonl"
    rows = pool_rows(engine, tokenizer, cfg, verifier, pool_path, dist, log)

    # 2. Distillation over the replayed states of the kept trajectories.
    stop = min(t.max_steps, t.stop_at_step or t.max_steps)
    tic, loss_acc = time.perf_counter(), []
    while step < stop:
        for micro in range(t.grad_accum):
            idx = batch_rows(step, micro, dist.rank, dist.world_size, t.micro_batch_size, t.grad_accum,
                             len(rows), t.seed).tolist()
            with autocast(dist.device, t.precision):
                token_logp, committed = replay_logprobs(engine, [rows[i] for i in idx], special)
                loss, stats = order_loss(token_logp, committed)
            engine.backward(loss)
            eng.step(engine)
            loss_acc.append(loss.detach())
        step += 1
        if step % cfg.logging.log_every == 0 or step == stop:
            log.log(step, {"train/loss": eng.mean_over_ranks(torch.stack(loss_acc).mean()).item(),
                           "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": eng.grad_norm(engine),
                           "time/step": (time.perf_counter() - tic) / len(loss_acc) * t.grad_accum})
            log.progress(step, {"nll": f"{torch.stack(loss_acc).mean().item():.3f}"})
            tic, loss_acc = time.perf_counter(), []
        if (cfg.validation.every and step % cfg.validation.every == 0) or step == t.max_steps:
            val = validate(engine, tokenizer, val_tasks, p.sampler, cfg.validation.fast_threshold,
                           p.batch_size, t.seed, verifier)
            history.append({"step": step, **val})
            log.log(step, flat_validation(val))
            log.write(f"[onpolicy] step {step}: {describe(val)}")
        if (t.save_every and step % t.save_every == 0) or step == stop:
            ckpt.save_checkpoint(engine, out / "checkpoints", step, {"step": step, "val_history": history},
                                 t.keep_checkpoints, dist.is_main, dist.rank, dist.world_size)

    # 3. Export.
    finished = step == t.max_steps
    if finished:
        export(engine, tokenizer, out / "final", dist.is_main, cfg,
               {"threshold": cfg.validation.fast_threshold})
    verifier.close()
    summary = {"output_dir": str(out), "final_model": str(out / "final") if finished else None, "steps": step,
               "pool": str(pool_path), "pool_kept": len(rows), "val_history": history}
    write_summary(out, summary, dist.is_main)
    log.write(f"[onpolicy] stage 3 done at step {step}: {describe(history[-1])}")
    log.close()
    eng.shutdown()
    return summary
