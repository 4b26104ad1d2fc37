"""Noise schedules gamma_t (probability a token is masked at time t) and the draw of t.

docs/method.md, stage 1: the masked-diffusion ELBO weights each masked token by gamma'_t / gamma_t.
"""

from __future__ import annotations

import math

import torch


def mask_rate(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """gamma_t in [0, 1] for t in [0, 1]. linear: t. cosine: 1 - cos(pi t / 2)."""
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 1.0 - torch.cos(0.5 * math.pi * t)
    raise ValueError(f"unknown schedule '{schedule}' (linear, cosine)")


def elbo_weight(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """gamma'_t / gamma_t, the ELBO weight of a masked token. linear: 1/t."""
    if schedule == "linear":
        return 1.0 / t
    if schedule == "cosine":
        half_pi = 0.5 * math.pi
        return half_pi * torch.sin(half_pi * t) / (1.0 - torch.cos(half_pi * t))
    raise ValueError(f"unknown schedule '{schedule}' (linear, cosine)")


def sample_times(batch: int, method: str, eps: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """t in [eps, 1], one per sequence: [batch].

    stratified: one uniform offset u, t_i = (u + i/batch) mod 1, so the batch covers [0, 1) evenly
      (the low-discrepancy sampler of Kingma et al. 2021 / MDLM); unbiased per element.
    antithetic: pairs (u, 1 - u).  iid: independent uniforms.
    """
    if method == "stratified":
        u = torch.rand(1, generator=generator)
        t = (u + torch.arange(batch) / batch) % 1.0
    elif method == "antithetic":
        u = torch.rand((batch + 1) // 2, generator=generator)
        t = torch.cat([u, 1.0 - u])[:batch]
    elif method == "iid":
        t = torch.rand(batch, generator=generator)
    else:
        raise ValueError(f"unknown t sampling '{method}' (stratified, antithetic, iid)")
    return eps + (1.0 - eps) * t
