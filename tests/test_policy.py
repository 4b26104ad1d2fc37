"""The stage-4 math (onpolicy.diffusion.policy) on hand-computed cases."""

import math

import pytest
import torch

from onpolicy.diffusion.policy import (
    clipped_policy_loss,
    group_advantages,
    jump_distillation_loss,
    kl_penalty,
    live_groups,
    progress_cost_loss,
    soft_commit_logprob,
    step_progress,
    trajectory_reward,
)


def test_rewards_multiplicative_and_additive():
    V, K, L = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([4, 10, 1]), torch.tensor([10, 10, 10])
    assert trajectory_reward(V, K, L, "multiplicative", 1.0, 0.0).tolist() == pytest.approx([0.7, 0.1, 0.0])
    assert trajectory_reward(V, K, L, "multiplicative", 0.5,
                             0.0).tolist() == pytest.approx([math.sqrt(0.7), math.sqrt(0.1), 0.0])
    # accuracy only
    assert trajectory_reward(V, K, L, "multiplicative", 0.0, 0.0).tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert trajectory_reward(V, K, L, "additive", 0.0, 0.5).tolist() == pytest.approx([0.8, 0.5, -0.05])
    with pytest.raises(ValueError, match="not one of"):
        trajectory_reward(V, K, L, "exponential", 1.0, 0.0)


def test_group_advantages_and_excluded_samples():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    adv, stats = group_advantages(r, torch.ones_like(r, dtype=torch.bool), "group")
    s = 1 / math.sqrt(3)  # unbiased std of (1, 0, 0, 1)
    assert adv[0].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rel=1e-3)
    assert adv[1].tolist() == [0.0] * 4
    assert float(stats["frac_reward_zero_std"]) == 0.5 and float(stats["reward"]) == pytest.approx(0.5)
    # an excluded sample counts in no statistic and gets no advantage
    r = torch.tensor([[1.0, 0.0, 0.0, 123.0]])
    valid = torch.tensor([[True, True, True, False]])
    adv, stats = group_advantages(r, valid, "none")
    assert adv[0].tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0])
    assert float(stats["reward"]) == pytest.approx(1 / 3)
    adv, _ = group_advantages(r, valid, "group")
    assert adv[0].tolist() == pytest.approx([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, 0.0], rel=1e-3)
    # a group left with one valid sample has no baseline
    adv, _ = group_advantages(torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]]), "group")
    assert adv.tolist() == [[0.0, 0.0]]


def test_live_groups_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [0.7, 0.7, 0.7, 0.2], [1.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True] * 4, [True] * 4, [True, True, True, False], [True, False, False, False]])
    # varies; all equal; equal once the excluded 0.2 is left out; one valid sample (no baseline)
    assert live_groups(r, valid).tolist() == [True, False, False, False]
    assert live_groups(torch.tensor([[0.3, 0.3 + 1e-3]]),
                       torch.ones(1, 2, dtype=torch.bool)).tolist() == [True]


def test_soft_commit_logprob_by_hand():
    score = torch.tensor([[0.9, 0.5, 0.2], [0.9, 0.5, 0.2], [0.9, 0.5, 0.2]])
    open_ = torch.tensor([[True, True, True], [True, True, True], [False, True, True]])
    committed = torch.tensor([[True, False, False], [True, True, False], [False, True, False]])
    q = [1 / (1 + math.exp(-4)), 0.5, 1 / (1 + math.exp(3))]  # sigmoid((score - 0.5) / 0.1)
    got = soft_commit_logprob(score, open_, committed, 0.5, 0.1).tolist()
    # row 0: only the top one committed: drawn alone, or none drawn and it was the fallback
    drawn_alone, fallback = q[0] * (1 - q[1]) * (1 - q[2]), (1 - q[0]) * (1 - q[1]) * (1 - q[2])
    assert got[0] == pytest.approx(math.log(drawn_alone + fallback))
    assert got[1] == pytest.approx(math.log(q[0] * q[1] * (1 - q[2])))
    # row 2: position 0 is not open (committed earlier); position 1 is the top open one
    assert got[2] == pytest.approx(math.log(q[1] * (1 - q[2]) + (1 - q[1]) * (1 - q[2])))


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))  # ratios
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[True, True], [True, False]])
    # per term: -min(r A, clip(r) A): row 0: -min(1.5, 1.28) = -1.28, -1; row 1: -min(-0.5, -0.8) = 0.8
    loss, stats = clipped_policy_loss(logp, old, adv, mask, 0.2, 0.28, "dapo")
    assert float(loss) == pytest.approx((-1.28 - 1.0 + 0.8) / 3)
    assert float(stats["clip_ratio"]) == pytest.approx(2 / 3)
    loss, _ = clipped_policy_loss(logp, old, adv, mask, 0.2, 0.28, "grpo")
    assert float(loss) == pytest.approx(((-1.28 - 1.0) / 2 + 0.8) / 2)
    loss, _ = clipped_policy_loss(logp, old, adv, mask, 0.2, 0.28, "dr_grpo", denominator=2 * 4)
    assert float(loss) == pytest.approx((-1.28 - 1.0 + 0.8) / (2 * 4))
    # at ratio 1 the gradient is the plain policy gradient: d/dlogp of -A * ratio = -A
    lp = torch.zeros(1, 1, requires_grad=True)
    clipped_policy_loss(lp, torch.zeros(1, 1), torch.tensor([2.0]), torch.ones(1, 1, dtype=torch.bool), 0.2,
                        0.2, "dapo", 1)[0].backward()
    assert lp.grad.item() == pytest.approx(-2.0)


def test_progress_is_counted_per_step_and_costs_low_progress_steps_most():
    step_index = torch.tensor([[0, 0, 1, -1], [0, 1, 2, 3]])
    assert step_progress(step_index, 4).tolist() == [[2, 1, 0, 0], [1, 1, 1, 1]]
    nll = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    still = torch.tensor([[True, True, False, False]])
    p = torch.tensor([[2.0, 2.0, 1.0, 1.0]])  # the step this state precedes committed 2 tokens
    loss, stats = progress_cost_loss(nll, still, p, torch.tensor([True]), lam=0.5)
    assert float(loss) == pytest.approx((0.25 * 1 + 0.25 * 2) / 2)  # lam / 2 per masked position, averaged
    failed, _ = progress_cost_loss(nll, still, p, torch.tensor([False]), lam=0.5)
    assert float(failed) == 0.0  # only correct trajectories are made shorter


def test_jump_distillation_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # position 0: right and peaked; position 1:
    # uniform
    target = torch.tensor([[0, 1]])
    jump = torch.tensor([[True, True]])
    loss, stats = jump_distillation_loss(logits, target, jump, torch.tensor([1.0]), certainty=0.5)
    p0 = torch.tensor([2.0, 0.0, 0.0]).softmax(0)
    ce = (-math.log(p0[0]) + math.log(3)) / 2
    ent0 = float(-(p0 * p0.log()).sum())  # only position 0 is already right (argmax of uniform is 0, target
    # 1)
    assert float(stats["jump_ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(loss) == pytest.approx(ce + 0.5 * ent0, rel=1e-5)
    none, _ = jump_distillation_loss(logits, target, jump, torch.tensor([0.0]), certainty=0.5)
    assert float(none) == 0.0  # failing rows teach nothing


def test_kl_penalty_k3():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.5, 0.5]]))
    kl = kl_penalty(logp, ref, torch.tensor([[True, True]]))
    assert kl[0, 0].item() == pytest.approx(0.0)
    assert kl[0, 1].item() == pytest.approx(2 - math.log(2) - 1)
