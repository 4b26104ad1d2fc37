"""Forward (noising) processes, batched. docs/method.md, stages 1 (mask) and 2 (edit)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

EDIT_OPS = ("substitute", "delete", "insert")


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


@dataclass
class EditCorruption:
    x_t: torch.Tensor  # [B, L] the corrupted canvas (index-aligned with x0: the target at i is x0[i])
    edited: torch.Tensor  # [B, L + k_max] the edited sequence before canvas alignment (fill past its length)
    lengths: torch.Tensor  # [B] length of the edited sequence: L - deletions + insertions
    ops: torch.Tensor  # [B, 3] substitutions, deletions, insertions applied


def edit_tokens(
    x0: torch.Tensor,
    k: torch.Tensor,
    ordinary: torch.Tensor,
    fill_id: int,
    generator: torch.Generator | None = None,
) -> EditCorruption:
    """Edit corruption (docs/method.md, stage 2), batched: k[b] random edits of x0[b], each a substitution,
    deletion or insertion chosen uniformly.

    x0: [B, L]; k: [B] int, edits per sequence (k_t = floor(L * alpha_t), at most L); ordinary: [V]
    bool, the tokens an edit may write (never MASK, PAD, EOS or other specials); fill_id: the token
    that fills the canvas where deletions left it short (MASK: "something is missing here").

    Substitutions and deletions hit distinct source positions (a permutation), and a substitution
    always writes a different token, so exactly k[b] edits apply and d_Lev(x0, edited) <= k[b].
    Insertions go into uniformly drawn gaps (0..L), several into one gap allowed.

    Length alignment (our choice, docs/method.md): a fixed canvas. The edited sequence (length L - deletions
    + insertions) is truncated to L, or filled with `fill_id` to L; the target stays x0, index-aligned,
    so after a deletion the model learns to pull the following tokens back, after an insertion to push
    them on. The edited sequence itself is returned too (`edited`, `lengths`) for inspection and tests.
    """
    b, length = x0.shape
    device = x0.device
    k = k.to(torch.long).clamp(0, length).cpu()
    k_max = int(k.max()) if b else 0
    allowed = torch.nonzero(ordinary.cpu(), as_tuple=True)[0]  # [A]
    if allowed.numel() < 2:
        raise ValueError("edit corruption needs at least two ordinary vocabulary tokens")
    x0_cpu = x0.cpu()
    slot = torch.arange(k_max)[None].expand(b, -1)  # [B, K]
    live = slot < k[:, None]
    kind = torch.randint(0, 3, (b, k_max), generator=generator).masked_fill(~live, -1)  # 0 sub, 1 del, 2 ins
    n_sub, n_del = (kind == 0).sum(1), (kind == 1).sum(1)
    # distinct source positions: the first n_sub of a random permutation are
    # substituted, the next n_del deleted
    order = torch.rand(b, length, generator=generator).argsort(1)  # [B, L]
    # rank of each position
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(length).expand(b, -1))
    substituted = rank < n_sub[:, None]
    deleted = (rank >= n_sub[:, None]) & (rank < (n_sub + n_del)[:, None])
    # a different ordinary token for each substitution
    draw = torch.randint(0, allowed.numel(), (b, length), generator=generator)
    new = allowed[draw]
    same = new == x0_cpu
    new = torch.where(same, allowed[(draw + 1) % allowed.numel()], new)
    source = torch.where(substituted, new, x0_cpu)
    # insertions: a gap g in 0..L (before source position g) and an ordinary token each
    inserting = kind == 2
    gap = torch.randint(0, length + 1, (b, k_max), generator=generator)
    inserted = allowed[torch.randint(0, allowed.numel(), (b, k_max), generator=generator)]
    # merge: sort by key (inserted into gap g: 2g; source position i: 2i + 1); removed elements last
    inf = 4 * length + 4
    keys = torch.cat([torch.where(deleted, inf, 2 * torch.arange(length)[None] + 1),
                      torch.where(inserting, 2 * gap, inf)], 1)
    tokens = torch.cat([source, inserted], 1)
    keys, perm = keys.sort(dim=1, stable=True)
    edited = tokens.gather(1, perm)
    lengths = length - n_del + inserting.sum(1)
    edited = edited.masked_fill(torch.arange(length + k_max)[None] >= lengths[:, None], fill_id)
    ops = torch.stack([n_sub, n_del, inserting.sum(1)], 1)
    return EditCorruption(edited[:, :length].to(device), edited.to(device), lengths.to(device),
                          ops.to(device))
