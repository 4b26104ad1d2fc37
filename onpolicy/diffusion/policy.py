"""The on-policy stage's math as pure functions (docs/method.md, stage 4): rewards, group advantages, the
clipped policy-gradient term, the soft-threshold commit policy, the edit-distance surrogates, KL.

Shapes: N samples (rows), T canvas positions, S steps. Every function takes tensors and scalars and
returns (loss, stats) or tensors; no config, no model, no engine.

docs/method.md, equation (4):  min E_tau[ |tau| - V(tau) ]   (V: the verifier; |tau|: the number of steps)
docs/method.md, equation (5):  |tau| proportional to E_ij[ 1 / d_Lev(tau_i, tau_j) ]   (the "progressive
surrogate")
"""

from __future__ import annotations

import torch

REWARD_FORMS = ("multiplicative", "additive")
SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
ZERO_STD = 1e-6  # a group whose rewards' std is below this carries no policy gradient


def trajectory_reward(score: torch.Tensor, steps: torch.Tensor, length: torch.Tensor, form: str, alpha: float,
                      lam: float) -> torch.Tensor:
    """Reward of each trajectory from its verifier score V in [0, 1], its steps K (forwards) and its
    length L (canvas tokens it decoded): [N] x 3 -> [N].

    multiplicative (Apple's "Learning Unmasking Policies"):  V * ((L - K + 1) / L) ** alpha
    additive (kept for the ablation; it pays fast wrong answers): V - lam * K / L
    alpha = 0 or lam = 0 is accuracy only.
    """
    L = length.clamp(min=1).float()
    K = steps.float().clamp(min=1)
    if form == "multiplicative":
        return score * ((L - K + 1).clamp(min=1) / L) ** alpha
    if form == "additive":
        return score - lam * K / L
    raise ValueError(f"reward form '{form}' is not one of {REWARD_FORMS}")


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, scale: str = "group", eps: float = 1e-4
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Group-relative advantages: rewards [P, G] (G samples of each of P prompts), valid [P, G] False for
    samples excluded by an infrastructure failure (they count in no statistic and get advantage 0).

    A = r - mean_group(r), divided by the group's std (scale="group", GRPO), the batch's std ("batch",
    as Dr. GRPO suggests against the difficulty bias), or nothing ("none"). Returns ([P, G], stats).
    """
    v = valid.float()
    n, centred, group_std = _group_spread(rewards, valid)
    if scale == "group":
        adv = centred / (group_std + eps)
    elif scale == "batch":
        all_valid = rewards[valid]
        adv = centred / ((all_valid.std() if all_valid.numel() > 1 else torch.tensor(0.0)) + eps)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"scale_rewards '{scale}' is not one of {SCALE_REWARDS}")
    counted = n[:, 0] > 1  # a group with fewer than two valid samples has no baseline
    adv = adv * counted[:, None]
    stats = {
        "reward": (rewards * v).sum() / v.sum().clamp(min=1),
        "reward_std": group_std[counted].mean() if counted.any() else torch.tensor(0.0),
        "frac_reward_zero_std": ((group_std[counted] < ZERO_STD).float().mean() if counted.any()
                                 else torch.tensor(1.0)),
    }
    return adv, stats


def live_groups(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[P, G] rewards and validity -> [P] bool: the groups whose valid rewards vary (at least two valid
    samples, std >= ZERO_STD: the complement of `frac_reward_zero_std`). Only these carry a policy gradient
    under group-relative advantages; DAPO's dynamic sampling replaces the others with fresh prompts."""
    n, _, group_std = _group_spread(rewards, valid)
    return (n[:, 0] > 1) & (group_std[:, 0] >= ZERO_STD)


def _group_spread(rewards: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    """Per group of [P, G]: valid samples n [P, 1], rewards minus the group's valid mean [P, G] (0 where
    excluded), and their unbiased std [P, 1] (as TRL)."""
    v = valid.float()
    n = v.sum(1, keepdim=True)
    mean = (rewards * v).sum(1, keepdim=True) / n.clamp(min=1)
    centred = (rewards - mean) * v
    return n, centred, ((centred**2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()


def soft_commit_logprob(score: torch.Tensor, open_: torch.Tensor, committed: torch.Tensor, threshold: float,
                        temperature: float) -> torch.Tensor:
    """log-probability of one step's commit decisions under the soft threshold: [N, T] x 3 -> [N].

    Each open position commits with q = sigmoid((score - threshold) / temperature), score = the
    model's top probability there; when no position is drawn the top-scoring one is committed anyway
    (at least one per step). So the decision d has probability prod_d q * prod_{open \\ d} (1 - q),
    plus prod_open (1 - q) when d is exactly the top position (the fallback). With it, how many tokens
    a step commits is an action with a gradient (dUltra; "Learning Unmasking Policies").
    """
    z = (score - threshold) / temperature
    log_q, log_not = torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)
    decided = torch.where(committed, log_q, log_not) * open_  # [N, T]
    logp = decided.sum(-1)
    none_drawn = (log_not * open_).sum(-1)
    top = score.masked_fill(~open_, -float("inf")).argmax(-1, keepdim=True)  # [N, 1]
    only_top = (committed.sum(-1) == 1) & committed.gather(-1, top)[:, 0]
    return torch.where(only_top, torch.logaddexp(logp, none_drawn), logp) * open_.any(-1)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, epsilon: float, epsilon_high: float, loss_type: str,
                        denominator: float | None = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-style clipped policy gradient over one kind of term of each trajectory's log-probability.

    logp, old_logp: [N, T] log-probability of each action (a committed token given the state before
    its step, or a step's commit decision) now and at rollout time; advantages: [N]; mask: [N, T]
    which terms exist. ratio = exp(logp - old_logp), clipped to [1 - epsilon, 1 + epsilon_high]:
        per term: -min(ratio * A, clip(ratio) * A)
    loss_type: grpo (mean over a row's terms, then over rows), dr_grpo (sum / (rows * max_tokens), no
    length bias), dapo (sum / all terms). For dr_grpo and dapo, `denominator` is the whole step's
    (TRL: every micro-batch of the step divides by the same number), so the split into micro-batches
    does not change the gradient; None: these rows' own (rows * width, or their term count).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    per_term = -torch.minimum(ratio * adv, clipped * adv) * mask  # [N, T]
    m = mask.float()
    if loss_type == "grpo":
        loss = (per_term.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = per_term.sum() / (denominator or mask.shape[0] * mask.shape[1])
    elif loss_type == "dapo":
        loss = per_term.sum() / (denominator or m.sum().clamp(min=1))
    else:
        raise ValueError(f"loss_type '{loss_type}' is not one of {LOSS_TYPES}")
    with torch.no_grad():
        is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        stats = {"clip_ratio": (is_clipped.float() * m).sum() / m.sum().clamp(min=1)}
    return loss, stats


def pg_denominator(loss_type: str, terms: int, rows: int, max_terms: int) -> float | None:
    """The whole step's divisor of a `clipped_policy_loss` term kind: dapo, its count of terms; dr_grpo, a
    constant (rows * max_terms); grpo, None (it averages per row)."""
    if loss_type == "dapo":
        return float(max(1, terms))
    if loss_type == "dr_grpo":
        return float(max(1, rows) * max_terms)
    return None


def speed_noise_groups(passed: torch.Tensor, valid: torch.Tensor, forwards: torch.Tensor,
                       min_spread: int) -> torch.Tensor:
    """[P, G] x 3 -> [P] bool: groups where every valid sample passed and their step counts differ by fewer
    than `min_spread` forwards. Their rewards differ only by commit-sampling noise, which group
    normalisation would blow up to unit advantages; the trainer gives them none
    (`reward.min_speed_spread`)."""
    big = torch.iinfo(torch.long).max
    hi = torch.where(valid, forwards, -big).max(-1).values
    lo = torch.where(valid, forwards, big).min(-1).values
    all_pass = (passed | ~valid).all(-1) & valid.any(-1)
    return all_pass & (hi - lo < min_spread)


def step_progress(step_index: torch.Tensor, n_steps: int) -> torch.Tensor:
    """p_k: tokens each step committed, for a pure-unmasking trajectory: step_index [N, T] (-1 = none)
    -> [N, S]. For pure unmasking d_Lev(s_k, x0) - d_Lev(s_k+1, x0) is exactly the number of tokens
    step k revealed (each reveal fixes one substitution of MASK by the final token), so progress is
    counted, not raw change."""
    idx = step_index.clamp(min=0)
    counts = torch.zeros(step_index.shape[0], n_steps, dtype=torch.float, device=step_index.device)
    return counts.scatter_add_(1, idx, (step_index >= 0).float())


def progress_cost_loss(nll: torch.Tensor, still_masked: torch.Tensor, step_tokens: torch.Tensor,
                       passed: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The progress-cost surrogate of equation (5) of docs/method.md, pathwise, for one replayed state s_k of
    each row.

    On passing trajectories step k costs lam / max(p_k, 1), p_k its progress (tokens it committed; see
    `step_progress`). Minimising the number of steps means raising p_k where it is small; what lets a
    threshold sampler commit more at s_k is a higher likelihood of the final tokens still masked
    there. So: the NLL of those tokens, weighted by the cost of the step they wait in; steps that made
    little progress pull hardest, churn earns nothing (only the final tokens count).

    nll: [N, T] -log p(x0_i | s_k); still_masked: [N, T] positions masked in s_k; step_tokens: [N, T]
    p_k of the step each position waits in (block_causal: its block's step); passed: [N] bool.
    loss = sum lam / max(p, 1) * nll over masked positions of passing rows / their count.
    """
    m = (still_masked & passed[:, None]).float()
    cost = lam / step_tokens.clamp(min=1)
    loss = (cost * nll * m).sum() / m.sum().clamp(min=1)
    with torch.no_grad():
        stats = {"progress_cost": (cost * m).sum() / m.sum().clamp(min=1)}
    return loss, stats


def jump_distillation_loss(logits: torch.Tensor, target: torch.Tensor, jump: torch.Tensor,
                           weight: torch.Tensor, certainty: float) -> tuple[torch.Tensor,
                                                                            dict[str, torch.Tensor]]:
    """Verified jump distillation (dParallel's certainty forcing, dFactory's path distillation): from an
    earlier state s_i of a passing trajectory, predict every token committed by a later state s_j.

    logits: [N, T, V] the model's logits in state s_i; target: [N, T] the final tokens; jump: [N, T] bool
    positions masked in s_i and committed by s_j; weight: [N] per row (1 for passing rows, 0 for failed ones,
    or the stage's `loss.distill_failed` for failed rows it self-distils too).
    loss = CE on the jump positions + certainty * entropy of the prediction where it is already right
    (dParallel: sharpen correct predictions so a threshold sampler commits them together).
    """
    logp = logits.float().log_softmax(-1)
    nll = -logp.gather(-1, target[..., None])[..., 0]  # [N, T]
    m = jump.float() * weight[:, None]
    denom = m.sum().clamp(min=1)
    ce = (nll * m).sum() / denom
    right = (logits.argmax(-1) == target).float() * m
    entropy = -(logp.exp() * logp).sum(-1)  # [N, T]
    ent = (entropy * right).sum() / right.sum().clamp(min=1)
    with torch.no_grad():
        stats = {"jump_ce": ce.detach(), "jump_entropy": ent.detach(), "jump_acc": right.sum() / denom}
    return ce + certainty * ent, stats


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-term KL(pi || pi_ref) estimate (Schulman's k3, as GRPO): exp(r - l) - (r - l) - 1 >= 0,
    with l = log pi, r = log pi_ref of the taken action. [N, T] -> [N, T] (0 where mask is False)."""
    d = ref_logp - logp
    return (torch.exp(d) - d - 1) * mask
