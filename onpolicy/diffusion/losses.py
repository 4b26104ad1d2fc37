"""Training losses as pure functions: (tensors, scalars) -> (loss, stats).

Normalisation: by the number of loss tokens in the batch (LLaDA / MDLM), not by the number of
masked tokens, so the value is an upper bound on the per-token NLL and comparable across t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_diffusion_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    masked: torch.Tensor,
    weight: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The masked-diffusion ELBO (docs/method.md, equation (1)):

        L = sum_b w(t_b) * sum_{i: x_t[b,i] = MASK} -log p(x0[b,i] | x_t[b]) / N

    logits: [B, L, V] the model's prediction from x_t, or [M, V] packed: the logits at the counted
    positions only (`masked & loss_mask`, row-major; the model's `logits_at`), the same loss without
    the rest of the head; x0: [B, L] clean tokens;
    masked: [B, L] bool, which positions x_t masks; weight: [B] gamma'_t / gamma_t;
    loss_mask: [B, L] bool, tokens that count (N = its sum); None = all.
    Padding is excluded by loss_mask; EOS tokens are real tokens and count (the model must learn
    where code ends).
    """
    if loss_mask is None:
        loss_mask = torch.ones_like(masked)
    counted = masked & loss_mask  # [B, L]
    if logits.dim() == 3:
        logits = logits[counted]
    target = x0[counted]  # [M]
    nll = F.cross_entropy(logits.float(), target, reduction="none")  # [M]
    n_tokens = loss_mask.sum().clamp(min=1)
    loss = (nll * weight[:, None].expand_as(counted)[counted]).sum() / n_tokens
    with torch.no_grad():
        n_masked = counted.sum().clamp(min=1)
        stats = {  # tensors (no device sync per micro-batch); read when logged
            "masked_nll": nll.sum() / n_masked,  # plain CE on masked tokens
            "masked_frac": counted.sum() / n_tokens,
            "masked_acc": (logits.argmax(-1) == target).sum() / n_masked,
        }
    return loss, stats


def token_nll(logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """-log p(x0[b, i] | x_t[b]) at every position: [B, L, V], [B, L] -> [B, L] (fp32)."""
    return F.cross_entropy(logits.float().flatten(0, 1), x0.flatten(), reduction="none").view_as(x0)


def edit_diffusion_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    masked: torch.Tensor,
    weight: torch.Tensor,
    edited: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage 2 (docs/method.md, equation (2): L_edit = -log p(x0 | x_t), loss on ALL positions) on top of the
    mask ELBO:

        L = [ sum_b w(t_b) sum_{i masked} nll[b,i]  +  sum_{b edited} sum_{i not masked} nll[b,i] ] / N

    Masked positions count as in `masked_diffusion_loss`; on an edit-corrupted row every visible
    position counts too (weight 1), so the model learns whether a visible token is right: the
    shortcut "an unmasked token is always correct" is gone. Rows not edited add the ELBO only (their
    visible tokens are x0's: a loss there would teach copying, the very shortcut).

    edited: [B] bool, rows with edit corruption; the rest as `masked_diffusion_loss`.
    """
    if loss_mask is None:
        loss_mask = torch.ones_like(masked)
    nll = token_nll(logits, x0)
    hidden = masked & loss_mask
    visible = ~masked & loss_mask & edited[:, None]
    n_tokens = loss_mask.sum().clamp(min=1)
    loss = ((nll * hidden * weight[:, None]).sum() + (nll * visible).sum()) / n_tokens
    with torch.no_grad():
        stats = {
            "masked_nll": (nll * hidden).sum() / hidden.sum().clamp(min=1),
            "masked_frac": hidden.sum() / n_tokens,
            "visible_nll": (nll * visible).sum() / visible.sum().clamp(min=1),
            "edited_frac": edited.float().mean(),
        }
    return loss, stats


def causal_lm_loss(
    logits: torch.Tensor, x0: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy for the AR baseline: position i predicts x0[i + 1].

    logits: [B, L, V]; x0: [B, L]; loss_mask: [B, L] bool on the *target* tokens (None = all).
    """
    pred, target = logits[:, :-1].float(), x0[:, 1:]  # [B, L-1, V], [B, L-1]
    mask = torch.ones_like(target, dtype=torch.bool) if loss_mask is None else loss_mask[:, 1:]
    nll = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none").view_as(target)
    n_tokens = mask.sum().clamp(min=1)
    loss = (nll * mask).sum() / n_tokens
    with torch.no_grad():
        stats = {"token_acc": ((pred.argmax(-1) == target) & mask).sum() / n_tokens}
    return loss, stats
