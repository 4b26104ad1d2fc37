"""Forward (noising) processes, batched. PAPER.md section 1 (mask) and 2 (edit, a later issue)."""

from __future__ import annotations

import torch


def mask_tokens(
    x0: torch.Tensor,
    rate: torch.Tensor,
    mask_id: int,
    maskable: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbing-state corruption: each maskable token becomes MASK with probability `rate`.

    x0: [B, L] token ids; rate: [B] gamma_t per sequence; maskable: [B, L] bool (False for prompt
    and padding: they are never noised). Returns (x_t [B, L], masked [B, L] bool).
    """
    u = torch.rand(x0.shape, generator=generator).to(x0.device)  # [B, L]
    masked = u < rate.to(x0.device)[:, None]
    if maskable is not None:
        masked &= maskable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked
