"""LoRA adapters (PEFT) on a model, in one place: every stage's `lora` section and `onpolicy export` of a
LoRA run go through `apply_lora`."""

from __future__ import annotations

import torch

from onpolicy.errors import ConfigError


def apply_lora(model: torch.nn.Module, lora, verbose: bool = False) -> torch.nn.Module:
    """PEFT LoRA adapters on `lora.target_modules` (default: every linear layer but the head); the base
    weights are frozen. r = 0 returns the model unchanged. A target that names no linear layer is a
    one-line ConfigError listing the names that would match; `verbose` prints the trainable and total
    parameter counts, as PEFT does."""
    if lora.r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules or "all-linear"
    if targets != "all-linear":
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        unknown = [t for t in targets if t not in names]
        if unknown:
            raise ConfigError(f"lora.target_modules: '{unknown[0]}' names no linear layer of this model; "
                              f"valid: {', '.join(names)}")
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=targets))
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"[lora] trainable params: {trainable:,} || all params: {total:,} || trainable%: "
              f"{100 * trainable / total:.4f}",
              flush=True)
    return model
