"""Stage 4, on-policy diffusion learning (docs/method.md, stage 4): the model samples, the sandbox judges,
and the loss makes correct paths short.

    onpolicy train recipes/tiny/stage4_onpolicy.yaml
    onpolicy train recipes/tiny/stage4_onpolicy.yaml --nproc 2 train.deepspeed=recipes/deepspeed/zero2.json

One step, top to bottom (`train` below):
  1. rollout: G samples of each prompt through the one sampler (`rollout.decode_tasks`), seeds from
     (seed, step, prompt, sample); each finished batch goes to the verifier in a background thread
     while the next one decodes;
  2. verify: a failing or timed-out program scores 0; an infrastructure failure (the plugin raises or
     hangs, a server is down) is excluded from every statistic, with its reason in the metrics;
  3. reward (equation (4) of docs/method.md): V * ((L - K + 1) / L)^alpha, or V - lam * K / L; group-relative
     advantages;
  4. loss over the replayed states (`rollout.replay_step_logits`: what the model saw at each step):
     the clipped policy gradient on the committed tokens and on the commit decisions, plus the
     edit-distance surrogate(s) of equation (5) of docs/method.md on passing trajectories, plus an optional KL
     (rows that feed only the jump term may be replayed at one drawn state per block instead:
     `loss.jump_states=sampled`; `loss.anchor` adds the prompts' reference solutions to that term, a
     supervised anchor);
  5. a DeepSpeed step; metrics; validation, best checkpoint and early stopping on a schedule.

What each term is (docs/method.md, stage 4): the token term is a policy gradient on sampled rollouts
(behaviour log-probs: temperature, top-k, top-p) and, on greedy ones (the tiny recipe), an
advantage-weighted likelihood of the model's own tokens; the commit-decision term is a policy gradient
either way (soft commits are drawn). The jump term distils verified paths (and, with `loss.distill_failed`,
failed rows without advantage: self-distillation); `loss.anchor` adds a supervised term on references.
Positions past the text the verifier ran are in no term. dapo and dr_grpo divide by the whole step's
count; token and decision terms are normalised apart.

Simplifications, stated: one optimizer step per rollout batch (so the importance ratio is 1 at the
step and clipping guards only against stale recorded log-probs; `replay_drift_*` shows it); soft commits
score a position by its top probability; validation counts excluded samples as failures; each rank decodes
and verifies its own share of the prompts (groups never span ranks).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass, field, replace

import torch

from onpolicy import checkpoint as ckpt
from onpolicy import engine as eng
from onpolicy.config import OnPolicyConfig
from onpolicy.data.tasks import load_task_set
from onpolicy.diffusion.policy import (
    clipped_policy_loss,
    group_advantages,
    jump_distillation_loss,
    kl_penalty,
    live_groups,
    pg_denominator,
    progress_cost_loss,
    soft_commit_logprob,
    speed_noise_groups,
    trajectory_reward,
)
from onpolicy.errors import ConfigError
from onpolicy.evaluation import within_tolerance
from onpolicy.export import save_skeleton
from onpolicy.metrics import MetricsLogger
from onpolicy.rollout import (
    VerifierPool,
    decode_tasks,
    excluded_reason,
    final_token_logprob,
    reference_trajectory,
    replay_masks,
    replay_sampled_states,
    replay_step_logits,
)
from onpolicy.sampling import TrajectoryRow, behaviour_logp
from onpolicy.tokenizer import SpecialTokens
from onpolicy.trainers.common import (
    autocast,
    build_model,
    describe,
    export,
    flat_validation,
    make_engine,
    model_hidden_size,
    noise_generator,
    open_run,
    plan_resume,
    resume,
    start_from_model,
    unwrap,
    validate,
    verifier_pool,
    write_summary,
)


def step_prompts(n_tasks: int, step: int, per_step: int, seed: int) -> list[int]:
    """Task indices of a step's prompts: consecutive slices of seeded permutations (epochs), so a resumed
    run draws exactly what the uninterrupted one would."""
    first = step * per_step
    out = []
    for i in range(first, first + per_step):
        perm = torch.randperm(n_tasks, generator=noise_generator(seed, -3, i // n_tasks))
        out.append(int(perm[i % n_tasks]))
    return out


def jump_gap(cfg: OnPolicyConfig, step: int) -> int:
    loss = cfg.loss
    frac = step / max(1, cfg.train.max_steps - 1)
    return round(loss.jump_gap_start + frac * (loss.jump_gap_end - loss.jump_gap_start))


def own_block_size(config) -> int | None:
    """The block a block-causal model was trained with (None for other attention modes). Stage 4 may
    decode at another (`rollout.sampler.block_size`, e.g. larger, to commit more per forward)."""
    return config.block_size if config.attention == "block_causal" else None


def extra_prompts(n_tasks: int, step: int, round_: int, seed: int) -> list[int]:
    """The candidate prompts of dynamic-sampling round `round_` (>= 1) of a step: a seeded permutation of
    its own, so a resumed run draws what the uninterrupted one would."""
    return torch.randperm(n_tasks, generator=noise_generator(seed, -5, step, round_)).tolist()


def rollout_phase(engine, tokenizer, tasks, cfg: OnPolicyConfig, step: int, pool: VerifierPool,
                  keys: list | None = None):
    """Decode G samples of each task; verification runs in the background as batches finish."""
    module = engine.module
    module.eval()
    params = list(module.parameters())
    gather = engine.zero_optimization_stage() == 3
    if gather:  # ZeRO-3: gather the weights once for the whole rollout, not once per forward
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    with ctx, torch.no_grad():
        decoded = decode_tasks(module, tokenizer, tasks, cfg.rollout.sampler, cfg.rollout.group_size,
                               cfg.train.seed, cfg.rollout.batch_size, step=step, keys=keys,
                               on_batch=pool.submit)
    module.train()
    return decoded


@dataclass
class StepSamples:
    """What one step trains on (whole groups, in order) and what it decoded in all (for the metrics)."""

    rollouts: list
    rewards: torch.Tensor  # [N] equation (4) of docs/method.md
    valid: torch.Tensor  # [N] False: excluded by an infrastructure failure
    passed: torch.Tensor  # [N]
    decoded_verdicts: list = field(default_factory=list)  # every decoded sample, kept or not
    verdicts: list = field(default_factory=list)  # the kept rows' verdicts, in order
    decoded_tokens: int = 0
    decoded_forwards: int = 0
    prompts_decoded: int = 0
    live: int = 0  # groups whose rewards vary among those kept
    rounds: int = 0
    t_rollout: float = 0.0
    t_verify: float = 0.0

    @property
    def pass_rate(self) -> float:
        counted = [v.passed for v in self.decoded_verdicts if v.status != "excluded"]
        return sum(counted) / len(counted) if counted else 0.0


def completion_rows(got: StepSamples, n: int, max_chars: int = 2000) -> list[dict]:
    """The first `n` kept completions of a step with their verdicts and rewards (TRL's log_completions):
    what a verifier plugin saw and said, without making it write files."""
    return [{"task_id": ro.task.task_id, "completion": ro.completion[:max_chars], "passed": bool(v.passed),
             "score": float(v.score), "status": v.status, "detail": v.detail[:200], "reward": float(reward),
             "forwards": int(ro.forwards), "tokens": int(ro.n_tokens)}
            for ro, v, reward in list(zip(got.rollouts, got.verdicts, got.rewards.tolist()))[:n]]


def sample_step(engine, tokenizer, pool_tasks, cfg: OnPolicyConfig, step: int, pool: VerifierPool,
                dist) -> StepSamples:
    """Steps 1-3 of the loop for this rank's prompts: decode G samples of each, verify, reward.

    DAPO's dynamic sampling (`rollout.dynamic_sampling` = N > 0): while fewer of this rank's groups carry a
    policy gradient (rewards that vary, `live_groups`) than it has prompts, up to N extra rounds decode as
    many fresh prompts as are missing; their live groups join the step, their dead ones are dropped. Round 0's
    dead groups stay (their passing samples feed the surrogates). Each extra round costs at most one round 0.
    """
    r, t = cfg.rollout, cfg.train
    mine = step_prompts(len(pool_tasks), step, r.prompts_per_step, t.seed)[dist.rank :: dist.world_size]
    want, taken = len(mine), set(mine)
    out = StepSamples([], torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))
    for round_ in range(r.dynamic_sampling + 1):
        if round_:
            mine = [i for i in extra_prompts(len(pool_tasks), step, round_,
                                             t.seed)[dist.rank :: dist.world_size]
                    if i not in taken][: max(0, want - out.live)]
            taken.update(mine)
        tic = time.perf_counter()
        decoded = rollout_phase(engine, tokenizer, [pool_tasks[i] for i in mine], cfg, step, pool,
                                keys=[(round_, i) for i in mine] if round_ else None)
        decoded_at = time.perf_counter()
        verdicts = pool.results()
        out.t_rollout += decoded_at - tic
        out.t_verify += time.perf_counter() - decoded_at
        rollouts = decoded.rollouts
        if rollouts:
            valid = torch.tensor([v.status != "excluded" for v in verdicts], dtype=torch.bool)
            score = torch.tensor([v.score if v.status != "excluded" else 0.0 for v in verdicts])
            steps_k = torch.tensor([ro.forwards for ro in rollouts])
            length = torch.tensor([len(ro.trajectory.canvas) for ro in rollouts])
            rewards = trajectory_reward(score, steps_k, length, cfg.reward.form, cfg.reward.alpha,
                                        cfg.reward.lam)
            live = live_groups(rewards.view(-1, r.group_size), valid.view(-1, r.group_size))
            keep = torch.ones_like(live) if round_ == 0 else live
            rows = keep.repeat_interleave(r.group_size).nonzero().flatten().tolist()
            out.rollouts += [rollouts[i] for i in rows]
            out.rewards = torch.cat([out.rewards, rewards[rows]])
            out.valid = torch.cat([out.valid, valid[rows]])
            out.passed = torch.cat([out.passed,
                                    torch.tensor([verdicts[i].passed for i in rows], dtype=torch.bool)])
            out.decoded_verdicts += verdicts
            out.verdicts += [verdicts[i] for i in rows]
            out.decoded_tokens += sum(ro.n_tokens for ro in rollouts)
            out.decoded_forwards += sum(ro.forwards for ro in rollouts)
            out.prompts_decoded += len(mine)
            out.live += int(live.sum())
        out.rounds = round_ + 1
        # every rank takes part in every round (a ZeRO-3 rollout gathers the weights collectively): stop
        # when no rank misses live groups
        if (round_ == r.dynamic_sampling
                or float(eng.mean_over_ranks(torch.tensor(float(out.live < want)))) == 0.0):
            break
    return out


def jump_positions(st, gap: int) -> torch.Tensor:
    """[B, T] bool: the jump's targets from the replayed state s_j: positions committed by steps j+1 .. j+gap,
    strictly later than s_j's own step (what step j itself commits is the policy term's, not the jump's)."""
    return (st.step_index > st.index) & (st.step_index <= st.index + gap)


def kept_positions(rows: list[TrajectoryRow], width: int, device) -> torch.Tensor:
    """[B, width] bool: the canvas positions each row's verdict covers (`TrajectoryRow.verified`); the rest
    was cut by a stop sequence and is in no loss term."""
    verified = torch.tensor([width if r.verified is None else r.verified for r in rows], device=device)
    return torch.arange(width, device=device)[None] < verified[:, None]


def pg_term_counts(rows: list[TrajectoryRow], special: SpecialTokens, mode: str,
                   decisions: bool) -> tuple[int, int]:
    """How many token terms and commit-decision terms `micro_batch_loss` gives these rows' policy gradient
    (the masks it builds, without a forward): what dapo divides the whole step by."""
    tokens = n_decisions = 0
    kept = None
    for st in replay_masks(rows, special, mode):
        if kept is None:  # the same for every replayed step
            kept = kept_positions(rows, st.now.shape[1], st.now.device)
        tokens += int((st.now & kept).sum())
        if decisions and mode != "causal":
            b, t = st.now.shape
            n_decisions += int((open_positions(st) & kept).view(b, t // st.block, st.block).any(-1).sum())
    return tokens, n_decisions


def is_jump_only(adv: float, passed: bool, distill: float, cfg: OnPolicyConfig) -> bool:
    """A row whose only term is the jump distillation: no policy gradient (advantage 0), and no progress
    cost (that reads every step of a passing row). With `loss.jump_states: sampled` such rows are replayed
    at one drawn state per block (`sampled_jump_loss`); their KL term, if any, is not computed."""
    return (cfg.loss.jump_states == "sampled" and adv == 0 and distill > 0
            and cfg.loss.surrogate in ("jump", "both") and not (passed and cfg.loss.surrogate == "both"))


def anchor_rows(tokenizer, rollouts, cfg: OnPolicyConfig, generator: torch.Generator) -> list[TrajectoryRow]:
    """`loss.anchor`: the reference solutions of the step's prompts (up to `loss.anchor_rows`, in prompt
    order) as trajectories at the rollouts' block size, each in a seeded random order within its blocks
    (`rollout.reference_trajectory`). They join the jump term like failed rollouts do, with weight
    `loss.anchor`: ground truth at every mask ratio of a block, so the model's own paths are not all it learns
    from."""
    if not rollouts:
        return []
    block = rollouts[0].trajectory.block_size
    rows = []
    for task in dict.fromkeys(ro.task for ro in rollouts):
        if len(rows) == cfg.loss.anchor_rows:
            break
        row = reference_trajectory(tokenizer, task, block, cfg.rollout.sampler.max_new_tokens, generator)
        if row is not None:
            rows.append(row)
    return rows


def sampled_jump_loss(model, rows, special: SpecialTokens, distill: torch.Tensor, cfg: OnPolicyConfig,
                      gap: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """The jump term of jump-only rows from one forward: each block at one state drawn from its recorded
    steps (`rollout.replay_sampled_states`), the same `jump_distillation_loss` as at every state."""
    st = replay_sampled_states(model, rows, special, generator)
    kept = kept_positions(rows, st.canvas.shape[1], st.canvas.device)
    loss, stats = jump_distillation_loss(st.logits, st.canvas, jump_positions(st, gap) & kept, distill,
                                         cfg.loss.certainty)
    return cfg.loss.jump_weight * loss, {f"{k}_sampled": v for k, v in stats.items()}


def commit_entropy(logits: torch.Tensor, now: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum, count) of the model's predictive entropy at the positions committed from this state ([B, T, V]
    logits, [B, T] bool): the `entropy` metric, each token at the state it was committed in. Only those
    positions are normalised, not the whole [B, T, V]."""
    with torch.no_grad():
        logp = logits[now].float().log_softmax(-1)
        return -(logp.exp() * logp).sum().cpu(), int(now.sum())


def open_positions(st) -> torch.Tensor:
    """[B, G] bool: the positions the sampler was choosing among at step j: still masked before it, in a
    block that step j worked on. block_causal replays every block at its own j-th step; a bidirectional
    canvas counts j across blocks, so at step j only the block that commits something is being decoded
    (later blocks are still masked but were never considered, as in the sampler)."""
    b, t = st.now.shape
    working = st.now.view(b, t // st.block,
                          st.block).any(-1, keepdim=True).expand(-1, -1, st.block).reshape(b, t)
    return (st.step_index >= st.index) & working


def commit_decisions(st, logp_all: torch.Tensor, open_: torch.Tensor, threshold: float, temperature: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """log-probability of step j's soft commit decision in every block ([B, n_blocks]) and which blocks
    made one ([B, n_blocks] bool), scored as the sampler drew them (`soft_commit_logprob`)."""
    b, t = open_.shape
    blocks = t // st.block
    score = logp_all.max(-1).values.exp()  # the top probability: the soft commit's score
    dec = soft_commit_logprob(score.reshape(b * blocks, st.block), open_.reshape(b * blocks, st.block),
                              st.now.reshape(b * blocks, st.block), threshold, temperature)
    return dec.view(b, blocks), open_.view(b, blocks, st.block).any(-1)


def micro_batch_loss(model, reference: Reference | None, rows, special: SpecialTokens, adv: torch.Tensor,
                     passed: torch.Tensor, distill: torch.Tensor, cfg: OnPolicyConfig, gap: int, device,
                     on_policy: torch.Tensor | None = None, share: float = 1.0,
                     pg_denominators: tuple[float | None, float | None] = (None, None),
                     old_decisions: dict | None = None) -> tuple[torch.Tensor, dict]:
    """The stage-4 loss of one micro-batch of recorded trajectories, over their replayed states: its part of
    the step's loss.

    adv: [B] advantages; passed: [B] bool (verified correct); distill: [B] jump-distillation weight of each
    row (1 for passing rows, `loss.distill_failed` for failed rows without advantage, `loss.anchor` for
    reference rows, else 0); on_policy: [B] bool, False for buffer and anchor rows (not decoded by these
    weights: no policy term). share: these rows' share of the step's rows (the per-row terms are averaged over
    the step); pg_denominators: the step's divisors of the token and decision terms (`pg_denominator`; None:
    this micro-batch's own, scaled by `share`); old_decisions: where the first update of a batch leaves its
    decision log-probs for the later ones (`loss.updates_per_batch`). Positions past a row's verified text are
    in no term. Every term is a pure function of `onpolicy.diffusion.policy`; this function only gathers their
    inputs from the replay.
    """
    lc, sc = cfg.loss, cfg.rollout.sampler
    token_logp = pg_token = committed = kept = None
    decisions, decision_mask = [], []
    totals = {"jump": torch.zeros((), device=device), "progress": torch.zeros((), device=device)}
    stats: dict[str, torch.Tensor] = {}
    entropy_sum, entropy_n = torch.zeros(()), 0
    seen = {"jump": 0, "progress": 0}  # replayed steps where each surrogate had positions
    on_pol = torch.ones(len(rows), dtype=torch.bool, device=device) if on_policy is None else on_policy
    jump_term = lc.surrogate in ("jump", "both") and bool((distill > 0).any())  # once, not per replayed step
    for st in replay_step_logits(model, rows, special):
        if kept is None:
            kept = kept_positions(rows, st.canvas.shape[1], device)
        now = st.now & kept
        logp_all = st.logits.float().log_softmax(-1)  # [B, T, V]
        tok = final_token_logprob(logp_all, st)  # [B, T] log p(final token | state before step j)
        # at each token's own step the policy term's token log-prob: the distribution the rollout drew from
        # (greedy: the model's own)
        token_logp = torch.where(now, tok, 0.0 if token_logp is None else token_logp)
        beh = tok if sc.temperature <= 0 else final_token_logprob(behaviour_logp(logp_all, sc), st)
        pg_token = torch.where(now, beh, 0.0 if pg_token is None else pg_token)
        committed = now if committed is None else committed | now
        ent_sum, ent_n = commit_entropy(st.logits, now & on_pol[:, None])
        entropy_sum, entropy_n = entropy_sum + ent_sum, entropy_n + ent_n
        open_ = open_positions(st) & kept
        if lc.commit_actions and sc.commit_temperature is not None:
            dec, dec_mask = commit_decisions(st, logp_all, open_, sc.threshold, sc.commit_temperature)
            decisions.append(dec)
            decision_mask.append(dec_mask)
        for name, (term, term_stats) in surrogate_terms(st, tok, now, open_, kept, distill, passed, gap, lc,
                                                        jump_term).items():
            totals[name] = totals[name] + term
            if term_stats is not None:  # its metrics: the mean over the steps where it has positions
                stats = {**stats, **{k: stats.get(k, 0) + v for k, v in term_stats.items()}}
                seen[name] += 1
    n_steps = st.index + 1
    token_mask = committed & on_pol[:, None]
    old_token = recorded_logprob(rows, pg_token.shape[1], device)
    pg, pg_stats = clipped_policy_loss(pg_token, old_token, adv, token_mask, lc.epsilon, lc.epsilon_high,
                                       lc.loss_type, pg_denominators[0])
    if decisions:
        pg = pg + decision_policy_loss(torch.cat(decisions, 1), torch.cat(decision_mask, 1) & on_pol[:, None],
                                       adv, lc, pg_denominators[1], old_decisions)
    per_row = lc.jump_weight * totals["jump"] / n_steps + totals["progress"] / n_steps
    kl = torch.zeros(())
    if lc.beta > 0:
        kl_term = reference_kl(model, reference, rows, special, token_logp, token_mask)
        per_row, kl = per_row + lc.beta * kl_term, kl_term.detach()
    step_normalised = lc.loss_type != "grpo" and pg_denominators[0] is not None
    loss = share * per_row + lc.pg_weight * pg * (1.0 if step_normalised else share)
    stats = {k: v / max(1, seen["progress" if k == "progress_cost" else "jump"]) for k, v in stats.items()}
    stats.update(pg_stats)
    # a step-normalised term adds up over micro-batches
    stats["pg_loss_sum" if step_normalised else "pg_loss"] = pg.detach()
    stats["kl"] = kl
    stats.update(replay_drift(pg_token.detach(), old_token, token_mask))
    if entropy_n:
        stats["entropy"] = entropy_sum / entropy_n
    return loss, stats


def decision_policy_loss(dec: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, lc,
                         denominator: float | None, old_decisions: dict | None) -> torch.Tensor:
    """The clipped policy term of the commit decisions, normalised apart from the tokens; their old
    log-prob: the first update's of the batch (the rollout's weights)."""
    old = dec.detach()
    if old_decisions is not None:
        old = old_decisions.setdefault("decisions", old)
    loss, _ = clipped_policy_loss(dec, old, adv, mask, lc.epsilon, lc.epsilon_high, lc.loss_type, denominator)
    return loss


def replay_drift(replayed: torch.Tensor, recorded: torch.Tensor, mask: torch.Tensor) -> dict:
    """How far the replayed log-probs of on-policy tokens are from those recorded at commit time (0 up to
    float error on a first update: the ratio is 1 and the clip inert; it grows with updates per batch)."""
    drift = (replayed - recorded).abs()[mask]
    if not drift.numel():
        return {"replay_drift_mean": torch.zeros(()), "replay_drift_max": torch.zeros(())}
    return {"replay_drift_mean": drift.mean(), "replay_drift_max": drift.max()}


def surrogate_terms(st, tok: torch.Tensor, now: torch.Tensor, open_: torch.Tensor, kept: torch.Tensor,
                    distill: torch.Tensor, passed: torch.Tensor, gap: int, lc,
                    jump: bool) -> dict[str, tuple[torch.Tensor, dict | None]]:
    """The edit-distance surrogates at one replayed state: {"jump" | "progress": (loss, stats or None when the
    term has no position at this state)}, each only when the loss has it."""
    out = {}
    if jump:
        targets = jump_positions(st, gap) & kept
        loss, stats = jump_distillation_loss(st.logits, st.canvas, targets, distill, lc.certainty)
        out["jump"] = (loss, stats if bool((targets & (distill > 0)[:, None]).any()) else None)
    if passed.any() and lc.surrogate in ("progress", "both"):
        b, t = open_.shape
        # p_k per position
        per_block = now.view(b, -1, st.block).sum(-1, keepdim=True).expand(-1, -1, st.block).reshape(b, t)
        loss, stats = progress_cost_loss(-tok, open_, per_block.float(), passed, lc.progress_lambda)
        out["progress"] = (loss, stats if bool((open_ & passed[:, None]).any()) else None)
    return out


def recorded_logprob(rows: list[TrajectoryRow], width: int, device) -> torch.Tensor:
    """[B, width] each committed token's log-prob recorded at rollout time under the behaviour policy (the
    temperature-1 one for greedy tokens), right-padded with 0: the old side of the token term's ratio."""
    old = [r.commit_logprob if r.behaviour_logprob is None else r.behaviour_logprob for r in rows]
    return torch.stack([torch.nn.functional.pad(o, (0, width - len(r.commit_logprob)))
                        for o, r in zip(old, rows)]).to(device)


def reference_kl(model, reference: Reference, rows, special: SpecialTokens, token_logp: torch.Tensor,
                 mask: torch.Tensor
                 ) -> torch.Tensor:
    """Mean k3 KL to the reference over the `mask` tokens ([B, T]), each at the state before its own step."""
    with torch.no_grad(), reference.use(model) as ref_model:
        ref_logp = torch.zeros_like(token_logp)
        for st in replay_step_logits(ref_model, rows, special):
            ref_logp = torch.where(st.now & mask, final_token_logprob(st.logits.float().log_softmax(-1), st),
                                   ref_logp)
    return kl_penalty(token_logp, ref_logp, mask).sum() / mask.sum().clamp(min=1)


class Reference:
    """The frozen reference of the KL term: the base with its LoRA adapters disabled (no second copy), or
    a frozen copy of the starting weights. `use(model)` yields what to run for reference logits."""

    def __init__(self, module, beta: float):
        self.copy = None
        peft = getattr(module, "module", module)  # a DeepSpeed engine keeps the PEFT model in .module
        # (unwrap() would go past it to the base)
        self.peft = peft if hasattr(peft, "disable_adapter") else None
        if beta > 0 and self.peft is None:
            self.copy = copy.deepcopy(unwrap(module)).eval().requires_grad_(False)

    @contextlib.contextmanager
    def use(self, model):
        if self.copy is not None:
            yield self.copy
        elif self.peft is not None:
            with self.peft.disable_adapter():  # the same forward, adapters off: the base model
                yield model
        else:
            yield model


def is_better(val: dict, best: dict | None, bar: float, tolerance: float) -> bool:
    """The best-checkpoint rule: both pass@1 (one token per step and fast) within `tolerance` of the bar
    (the starting model's one-token-per-step pass@1), then the most tokens per forward at the fast
    setting; ties go to the higher fast pass@1."""
    if not (within_tolerance(val["slow"]["pass@1"], bar, tolerance)
            and within_tolerance(val["fast"]["pass@1"], bar, tolerance)):
        return False
    if best is None:
        return True
    key = (val["fast"]["tokens_per_forward"], val["fast"]["pass@1"])
    return key > (best["fast"]["tokens_per_forward"], best["fast"]["pass@1"])


@dataclass
class TrainRow:
    """One row of a step's loss: a recorded trajectory and what the loss does with it."""

    trajectory: TrajectoryRow
    advantage: float  # group-relative advantage (0: no policy gradient)
    passed: bool  # verified correct (the progress surrogate reads these)
    on_policy: bool  # decoded by the current weights this step (buffer and anchor rows are not)
    distill: float  # weight in the jump distillation (0: none)


def training_rows(got: StepSamples, adv: torch.Tensor, buffer: list, tokenizer, cfg: OnPolicyConfig,
                  step: int) -> list[TrainRow]:
    """The rows a step trains on; rows that carry no signal are skipped. Verified trajectories of earlier
    steps (the buffer) join for the surrogate terms only (they are off-policy). With `loss.distill_failed`
    > 0, up to `loss.distill_rows` failed rollouts also feed the jump term (self-distillation of the model's
    own paths); with `loss.anchor` > 0 the prompts' reference solutions do (supervised)."""
    t, valid, rollouts = cfg.train, got.valid, got.rollouts
    ok = got.passed & valid
    distill = ok.float() * cfg.loss.distill_passed
    # only failed rows without a policy gradient: never against their own advantage
    if cfg.loss.distill_failed > 0:
        failed = (valid & ~ok & (adv == 0)).nonzero().flatten()
        pick = failed[torch.randperm(len(failed),
                                     generator=noise_generator(t.seed, -6, step))[: cfg.loss.distill_rows]]
        distill[pick] = cfg.loss.distill_failed
    useful = ((adv != 0) | (distill > 0)).nonzero().flatten().tolist()
    rows = [TrainRow(rollouts[i].trajectory, float(adv[i]), bool(ok[i]), True, float(distill[i]))
            for i in useful]
    if buffer and cfg.loss.buffer_rows:
        pick = torch.randperm(len(buffer),
                              generator=noise_generator(t.seed, -4, step))[: cfg.loss.buffer_rows].tolist()
        rows += [TrainRow(buffer[i], 0.0, True, False, 1.0) for i in pick]
    if cfg.loss.anchor > 0:
        rows += [TrainRow(row, 0.0, False, False, cfg.loss.anchor)
                 for row in anchor_rows(tokenizer, rollouts, cfg, noise_generator(t.seed, -8, step))]
    return rows


def step_pg_denominators(items: list[TrainRow], special: SpecialTokens, mode: str,
                         cfg: OnPolicyConfig) -> tuple[float | None, float | None]:
    """The whole step's divisors of the token and decision terms (`pg_denominator`), over the on-policy rows
    that carry a policy gradient on every rank, as TRL divides every micro-batch by the step's count."""
    lc, sc = cfg.loss, cfg.rollout.sampler
    if lc.loss_type == "grpo":
        return None, None
    rows = [it.trajectory for it in items if it.on_policy and it.advantage != 0]
    tokens, decisions = pg_term_counts(rows, special, mode, lc.commit_actions
                                       and sc.commit_temperature is not None) if rows else (0, 0)
    # DeepSpeed averages gradients over ranks: dividing by the ranks' mean count gives the
    # global sum / global count
    tokens, decisions, n = (float(eng.mean_over_ranks(torch.tensor(float(v))))
                            for v in (tokens, decisions, len(rows)))
    return (pg_denominator(lc.loss_type, tokens, n, sc.max_new_tokens),
            pg_denominator(lc.loss_type, decisions, n, sc.max_new_tokens))


def train_step(engine, reference: Reference, items: list[TrainRow], special: SpecialTokens,
               cfg: OnPolicyConfig, gap: int, grad_accum: int, step: int, dist,
               denominators: tuple[float | None, float | None] = (None, None),
               old_decisions: dict | None = None) -> dict:
    """The losses of `items` in `grad_accum` micro-batches and one optimizer step; the step's loss stats, each
    averaged over the rows that carry it (`*_max`: the maximum; `*_sum`: added up over micro-batches).
    denominators: the step's policy-term divisors (`step_pg_denominators`, once per rollout batch)."""
    t = cfg.train
    stat_sums: dict[str, list[float]] = {}  # key -> [sum over rows, rows]
    loss_sum = 0.0
    jump_only = [is_jump_only(it.advantage, it.passed, it.distill, cfg) for it in items]
    for k in range(grad_accum):
        chunk = range(k, len(items), grad_accum)
        if not chunk:  # keep DeepSpeed's accumulation count: a zero loss on the same graph
            loss = sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * 0.0
            engine.backward(loss)
            eng.step(engine)
            continue
        cheap = [items[i] for i in chunk if jump_only[i]]
        full = [items[i] for i in chunk if not jump_only[i]]
        loss, parts = 0.0, []

        def column(rows: list[TrainRow], name: str) -> torch.Tensor:
            return torch.tensor([getattr(row, name) for row in rows], device=dist.device)

        with autocast(dist.device, t.precision):
            if full:
                part, stats = micro_batch_loss(engine, reference, [it.trajectory for it in full], special,
                                               column(full, "advantage"), column(full, "passed"),
                                               column(full, "distill"), cfg, gap, dist.device,
                                               on_policy=column(full, "on_policy"),
                                               share=len(full) / len(items), pg_denominators=denominators,
                                               old_decisions=(None if old_decisions is None
                                                              else old_decisions.setdefault(k, {})))
                loss, parts = loss + part, parts + [(stats, len(full))]
            if cheap:
                part, stats = sampled_jump_loss(engine, [it.trajectory for it in cheap], special,
                                                column(cheap, "distill"), cfg, gap,
                                                noise_generator(t.seed, -7, step, k))
                loss, parts = loss + part * len(cheap) / len(items), parts + [(stats, len(cheap))]
        # DeepSpeed divides by grad_accum; the parts already sum to the step's loss
        engine.backward(loss * grad_accum)
        eng.step(engine)
        loss_sum += float(loss.detach()) if torch.is_tensor(loss) else loss
        for stats, n in parts:
            for key, v in stats.items():
                acc = stat_sums.setdefault(key, [0.0, 0])
                if key.endswith("_max"):  # a maximum over the step, not a mean
                    acc[0], acc[1] = max(acc[0], float(v)), 1
                elif key.endswith("_sum"):
                    acc[0], acc[1] = acc[0] + float(v), 1
                else:
                    acc[0], acc[1] = acc[0] + float(v) * n, acc[1] + n
    # a step whose rows all feed only the jump term has no policy gradient: nothing clipped, no KL, pg 0
    step_stats = {"pg_loss": 0.0, "kl": 0.0, "clip_ratio": 0.0,
                  **{k.removesuffix("_sum"): s / n for k, (s, n) in stat_sums.items()}}
    step_stats["loss"] = eng.mean_over_ranks(torch.tensor(loss_sum)).item()
    return step_stats


def step_metrics(got: StepSamples, adv_stats: dict, step_stats: dict, items: list[TrainRow],
                 cfg: OnPolicyConfig, gap: int, buffered: int, times: dict, optimizer: dict) -> dict:
    """One step's metrics, each on the population its name says: `rollout/*` and `completions/*` over every
    decoded sample (what the policy does), `reward*` and the loss terms over what the step trains on."""
    tokens, forwards = got.decoded_tokens, got.decoded_forwards
    excluded: dict[str, int] = {}
    for v in got.decoded_verdicts:
        if v.status == "excluded":
            key = f"verifier/excluded/{excluded_reason(v.detail)}"
            excluded[key] = excluded.get(key, 0) + 1
    return {
        **{k: float(v) for k, v in adv_stats.items()},
        **step_stats,
        "rollout/pass_rate": got.pass_rate,
        "rollout/prompts_decoded": got.prompts_decoded,
        "rollout/rounds": got.rounds,
        "rollout/live_groups": got.live,
        "rollout/tokens_per_forward": tokens / max(1, forwards),
        "rollout/forwards_per_token": forwards / max(1, tokens),
        "rollout/tokens_per_step": tokens / max(1, forwards),  # every forward of a row is one of its steps
        "completions/mean_length": tokens / max(1, len(got.decoded_verdicts)),
        "verifier/excluded": sum(v.status == "excluded" for v in got.decoded_verdicts),
        **excluded,
        **optimizer,
        "train/jump_gap": gap,
        "train/rows_trained": len(items),
        "train/rows_distilled_failed": sum(it.distill > 0 and not it.passed and it.on_policy for it in items),
        "train/rows_anchor": sum(not it.on_policy and not it.passed for it in items),
        "train/rows_jump_only_sampled": sum(is_jump_only(it.advantage, it.passed, it.distill, cfg)
                                            for it in items),
        "train/buffer": buffered,
        **{f"time/{k}": v for k, v in times.items()},
        "time/verifier_share": times["verify"] / max(1e-9, times["step"]),
    }


@dataclass
class Stage4:
    """What the loop's phases share: the engine and everything that feeds it (built once by `setup`)."""

    cfg: OnPolicyConfig
    engine: object
    scheduler: object
    reference: Reference
    tokenizer: object
    special: SpecialTokens
    pool: VerifierPool
    pool_tasks: list
    val_tasks: list
    grad_accum: int
    dist: object
    out: object  # the run folder (Path)
    log: MetricsLogger


@dataclass
class LoopState:
    """What a checkpoint carries from step to step (a resume restores it)."""

    step: int = 0
    history: list = field(default_factory=list)  # validations so far
    best: dict | None = None  # the best validation (its model is best/)
    bar: float | None = None  # the starting model's pass@1: the quality bar
    since_best: int = 0  # validations without a new best
    buffer: list = field(default_factory=list)  # verified trajectories of earlier steps (loss.buffer_size)

    @classmethod
    def restore(cls, client: dict) -> LoopState:
        return cls(client.get("step", 0), client.get("val_history", []), client.get("best"),
                   client.get("bar"), client.get("since_best", 0),
                   [TrajectoryRow.from_json(row) for row in client.get("buffer", [])])

    def client(self) -> dict:
        return {"step": self.step, "val_history": self.history, "best": self.best, "bar": self.bar,
                "since_best": self.since_best, "buffer": [row.to_json() for row in self.buffer]}


def setup(cfg: OnPolicyConfig) -> tuple[Stage4, LoopState]:
    """The prompts and the verifier (first: a misspelt task set or plugin fails before the model loads), the
    starting model in a DeepSpeed engine, the KL reference, a resumed state, the run folder and its log."""
    out, dist, tokenizer, special = start_from_model(cfg)
    t, r = cfg.train, cfg.rollout
    if r.prompts_per_step % dist.world_size:
        raise ValueError(f"rollout.prompts_per_step={r.prompts_per_step} must divide among {dist.world_size} "
                         "ranks")
    grad_accum = math.ceil(r.prompts_per_step // dist.world_size * r.group_size / t.micro_batch_size)
    pool_tasks = load_task_set(r.tasks, r.n_tasks, t.seed)
    val_tasks = load_task_set(cfg.validation.tasks, cfg.validation.n_tasks, t.seed)
    pool = verifier_pool(r.verifier, r.strict, r.verifier_timeout, "rollout.verifier", r.verifier_args,
                         r.pass_threshold)
    if dist.is_main:
        print(f"[onpolicy] verifier: {r.verifier}"
              + (f" {dict(r.verifier_args)}" if r.verifier_args else "")
              + (f", pass at score >= {r.pass_threshold:g}" if r.pass_threshold is not None else ""),
              flush=True)
    plan = plan_resume(out, t.resume, dist.world_size)
    ds_config = plan.apply(eng.deepspeed_config(t.deepspeed, t.micro_batch_size, grad_accum, dist.world_size,
                                                t.grad_clip, t.precision,
                                                 model_hidden_size(cfg.model)))
    model = build_model(cfg, special, adapt_attention=False)
    reference = Reference(model, cfg.loss.beta)
    u = cfg.loss.updates_per_batch  # the LR schedule counts optimizer steps: u per rollout step
    engine, scheduler = make_engine(replace(cfg, train=replace(t, grad_accum=grad_accum,
                                                               max_steps=t.max_steps * u,
                                                               warmup_steps=t.warmup_steps * u)), model,
                                    ds_config)
    state = LoopState.restore(resume(engine, plan, dist))
    log = open_run(out, cfg, engine, tokenizer, state.step, dist)
    log.write(f"[onpolicy] stage 4 from {cfg.model.init_from}: {len(pool_tasks)} prompts ({r.tasks}), "
              f"{r.prompts_per_step} x "
              f"{r.group_size} samples per step, ZeRO-{eng.zero_stage(ds_config)}, world={dist.world_size}, "
              f"LoRA r={cfg.lora.r}, surrogate={cfg.loss.surrogate}, reward={cfg.reward.form}"
              + (f", resumed at step {state.step}" if state.step else ""))
    return Stage4(cfg, engine, scheduler, reference, tokenizer, special, pool, pool_tasks, val_tasks,
                  grad_accum, dist, out, log), state


def prepare_model(s: Stage4, state: LoopState) -> None:
    """Refuse terms the model cannot take; on a fresh start, validate the starting model (the quality bar,
    at its own block size); switch to the rollout's block size if it differs."""
    cfg, r, module = s.cfg, s.cfg.rollout, unwrap(s.engine.module)
    own_block = own_block_size(module.config)
    if cfg.loss.jump_states == "sampled" and own_block is None:
        raise ConfigError("loss.jump_states=sampled needs a block-causal model (each block at its own "
                          "state); "
                          f"{cfg.model.init_from} is {module.config.attention}: use loss.jump_states=every")
    if cfg.loss.anchor > 0 and own_block is None:
        raise ConfigError("loss.anchor needs a block-causal model (its reference rows are written block by "
                          "block); "
                          f"{cfg.model.init_from} is {module.config.attention}: set loss.anchor=0")
    if state.bar is None:
        start = validate(s.engine, s.tokenizer, s.val_tasks,
                         replace(r.sampler, block_size=own_block or r.sampler.block_size),
                         cfg.validation.fast_threshold, r.batch_size, cfg.train.seed, s.pool,
                         rollout_rule=True)
        state.bar, state.best = start["slow"]["pass@1"], start
        state.history.append({"step": 0, **start})
        s.log.log(0, flat_validation(start))
        s.log.write(f"[onpolicy] start: {describe(start)}")
        export(s.engine, s.tokenizer, s.out / "best", s.dist.is_main, cfg,
               {"threshold": cfg.validation.fast_threshold})
    if r.sampler.block_size and own_block and r.sampler.block_size != own_block:
        # a larger (or smaller) block than the model was trained with: from here on it decodes,
        # replays and is exported at the rollout's block (block ids follow each trajectory's block;
        # the weights are unchanged)
        module.config.block_size = cfg.model.block_size = r.sampler.block_size
        # `export --step N`: checkpoints are at the new block
        save_skeleton(s.out, module, s.tokenizer, s.dist.is_main)
        s.log.write(f"[onpolicy] block size {own_block} -> {r.sampler.block_size} "
                    "(rollout.sampler.block_size)")


def step_advantages(got: StepSamples, cfg: OnPolicyConfig) -> tuple[torch.Tensor, dict]:
    """[N] group-relative advantages of a step's rows and their stats; all-pass groups whose speeds differ by
    noise only (`reward.min_speed_spread`) get none."""
    g = cfg.rollout.group_size
    adv, adv_stats = group_advantages(got.rewards.view(-1, g), got.valid.view(-1, g),
                                      cfg.reward.scale_rewards)
    if cfg.reward.min_speed_spread:
        forwards = torch.tensor([ro.forwards for ro in got.rollouts], dtype=torch.long).view(-1, g)
        noise = speed_noise_groups(got.passed.view(-1, g), got.valid.view(-1, g), forwards,
                                   cfg.reward.min_speed_spread)
        adv = adv * ~noise[:, None]
        adv_stats["frac_speed_noise_groups"] = noise.float().mean() if len(noise) else torch.tensor(0.0)
    return adv.flatten(), adv_stats


def one_step(s: Stage4, state: LoopState) -> dict:
    """Rollout and verification (in the background as batches finish; dynamic sampling may decode more
    prompts), rewards and advantages, the rows, their losses and the optimizer step; the step's metrics."""
    cfg, tic = s.cfg, time.perf_counter()
    got = sample_step(s.engine, s.tokenizer, s.pool_tasks, cfg, state.step, s.pool, s.dist)
    adv, adv_stats = step_advantages(got, cfg)
    items = training_rows(got, adv, state.buffer, s.tokenizer, cfg, state.step)
    gap = jump_gap(cfg, state.step)
    denominators = step_pg_denominators(items, s.special, unwrap(s.engine.module).config.attention, cfg)
    old_decisions: dict = {}  # the first update's decision log-probs, the old side of the later ones' ratios
    for _ in range(cfg.loss.updates_per_batch):
        step_stats = train_step(s.engine, s.reference, items, s.special, cfg, gap, s.grad_accum, state.step,
                                s.dist, denominators, old_decisions)
    if cfg.loss.buffer_size:
        state.buffer += [got.rollouts[i].trajectory
                         for i in (got.passed & got.valid).nonzero().flatten().tolist()]
        state.buffer = state.buffer[-cfg.loss.buffer_size :]
    state.step += 1
    t_step = time.perf_counter() - tic
    times = {"rollout": got.t_rollout, "verify": got.t_verify, "train": t_step - got.t_rollout - got.t_verify,
             "step": t_step}
    metrics = step_metrics(got, adv_stats, step_stats, items, cfg, gap, len(state.buffer), times,
                           {"train/lr": s.scheduler.get_last_lr()[0],
                            "train/grad_norm": eng.grad_norm(s.engine)})
    s.log.log(state.step, metrics)
    s.log.completions(state.step, completion_rows(got, cfg.rollout.log_completions))
    s.log.progress(state.step,
                   {"reward": f"{metrics['reward']:.3f}", "pass": f"{metrics['rollout/pass_rate']:.2f}",
                                "tok/fwd": f"{metrics['rollout/tokens_per_forward']:.2f}"})
    return metrics


def validation_phase(s: Stage4, state: LoopState) -> bool:
    """Validate, keep the best model (best/); True when patience says stop."""
    cfg, r = s.cfg, s.cfg.rollout
    val = validate(s.engine, s.tokenizer, s.val_tasks, r.sampler, cfg.validation.fast_threshold, r.batch_size,
                   cfg.train.seed, s.pool, rollout_rule=True)
    state.history.append({"step": state.step, **val})
    s.log.log(state.step, flat_validation(val))
    if is_better(val, state.best, state.bar, cfg.validation.quality_tolerance):
        state.best, state.since_best = {"step": state.step, **val}, 0
        export(s.engine, s.tokenizer, s.out / "best", s.dist.is_main, cfg,
               {"threshold": cfg.validation.fast_threshold})
    else:
        state.since_best += 1
    s.log.write(f"[onpolicy] step {state.step}: {describe(val)}; best so far: step "
                f"{state.best.get('step', 0)}")
    stop_now = bool(cfg.validation.patience) and state.since_best >= cfg.validation.patience
    if stop_now:
        s.log.write(f"[onpolicy] early stop: no new best in {state.since_best} validations")
    return stop_now


def train(cfg: OnPolicyConfig) -> dict:
    """Run stage 4 to `train.max_steps` (or an early stop); returns the summary (also summary.json)."""
    s, state = setup(cfg)
    prepare_model(s, state)
    t, v = cfg.train, cfg.validation
    stop = min(t.max_steps, t.stop_at_step or t.max_steps)
    while state.step < stop:
        one_step(s, state)
        due = (v.every and state.step % v.every == 0) or state.step == stop
        stop_now = validation_phase(s, state) if due else False
        if (t.save_every and state.step % t.save_every == 0) or state.step == stop or stop_now:
            ckpt.save_checkpoint(s.engine, s.out / "checkpoints", state.step, state.client(),
                                 t.keep_checkpoints, s.dist.is_main, s.dist.rank, s.dist.world_size)
        if stop_now:
            break
    # the last model (final/) beside the best (best/)
    finished = state.step == t.max_steps or (v.patience and state.since_best >= v.patience)
    if finished:
        export(s.engine, s.tokenizer, s.out / "final", s.dist.is_main, cfg, {"threshold": v.fast_threshold})
    s.pool.close()
    summary = {"output_dir": str(s.out), "final_model": str(s.out / "final") if finished else None,
               "best_model": str(s.out / "best"), "steps": state.step, "bar": state.bar, "best": state.best,
               "val_history": state.history}
    write_summary(s.out, summary, s.dist.is_main)
    if s.dist.is_main:
        s.log.write(f"[onpolicy] done at step {state.step}; best (step {state.best.get('step', 0)}): "
                    f"{describe(state.best)}")
        (s.out / "best" / "validation.json").write_text(json.dumps(state.best, indent=1))
    s.log.close()
    eng.shutdown()
    return summary
