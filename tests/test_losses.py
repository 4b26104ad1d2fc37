import math

import pytest
import torch

from onpolicy.diffusion.corruption import mask_tokens
from onpolicy.diffusion.losses import causal_lm_loss, masked_diffusion_loss
from onpolicy.diffusion.schedules import elbo_weight, mask_rate, sample_times


def test_masked_diffusion_loss_hand_computed():
    # One sequence of 3 tokens over a vocabulary of 2; positions 0 and 2 masked, t = 0.5 (weight 2).
    logits = torch.tensor([[[0.0, 0.0], [5.0, -5.0], [math.log(3.0), 0.0]]])  # p(x0=1) at pos 2 is 1/4
    x0 = torch.tensor([[0, 0, 1]])
    masked = torch.tensor([[True, False, True]])
    weight = torch.tensor([2.0])
    loss, stats = masked_diffusion_loss(logits, x0, masked, weight)
    # sum over masked: -log(1/2) - log(1/4) = log 2 + log 4 = 3 log 2; times 2; divided by 3 tokens
    assert loss.item() == pytest.approx(2 * 3 * math.log(2) / 3, rel=1e-6)
    assert float(stats["masked_frac"]) == pytest.approx(2 / 3)
    assert float(stats["masked_nll"]) == pytest.approx(1.5 * math.log(2), rel=1e-6)


def test_masked_loss_ignores_tokens_outside_loss_mask():
    logits = torch.zeros(1, 4, 5)
    x0 = torch.tensor([[1, 2, 3, 4]])
    masked = torch.ones(1, 4, dtype=torch.bool)
    loss_mask = torch.tensor([[True, True, False, False]])  # e.g. padding at the end
    loss, _ = masked_diffusion_loss(logits, x0, masked, torch.tensor([1.0]), loss_mask)
    assert loss.item() == pytest.approx(math.log(5), rel=1e-6)  # 2 * log 5 / 2 counted tokens


def test_causal_loss_hand_computed():
    # position i predicts x0[i+1]; uniform logits over 4 tokens except a sure prediction at pos 1
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 3] = 100.0
    x0 = torch.tensor([[0, 2, 3]])
    loss, stats = causal_lm_loss(logits, x0)
    assert loss.item() == pytest.approx(math.log(4) / 2, rel=1e-5)
    assert float(stats["token_acc"]) == pytest.approx(0.5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_elbo_weight_is_derivative_ratio(schedule):
    t = torch.tensor([0.05, 0.3, 0.7, 0.99], requires_grad=True)
    gamma = mask_rate(t, schedule)
    (dgamma,) = torch.autograd.grad(gamma.sum(), t)
    torch.testing.assert_close(elbo_weight(t.detach(), schedule), dgamma / gamma.detach())
    assert torch.all((gamma > 0) & (gamma <= 1))


def test_stratified_times_cover_every_stratum():
    g = torch.Generator().manual_seed(3)
    t = sample_times(8, "stratified", 1e-3, g)
    strata = ((t - 1e-3) / (1 - 1e-3) * 8).floor().long().sort().values
    assert strata.tolist() == list(range(8))
    a = sample_times(6, "antithetic", 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a[:3] + a[3:], torch.ones(3))


def test_mask_tokens_rates_and_maskable():
    g = torch.Generator().manual_seed(0)
    x0 = torch.arange(1000).view(2, 500) + 10
    x_t, masked = mask_tokens(x0, torch.tensor([0.0, 1.0]), mask_id=3, generator=g)
    assert not masked[0].any() and masked[1].all()
    assert (x_t[1] == 3).all() and torch.equal(x_t[0], x0[0])
    maskable = torch.zeros_like(x0, dtype=torch.bool)
    maskable[:, 250:] = True
    _, masked = mask_tokens(x0, torch.tensor([0.5, 0.5]), 3, maskable, generator=g)
    assert not masked[:, :250].any()
    assert 0.4 < masked[:, 250:].float().mean().item() < 0.6
