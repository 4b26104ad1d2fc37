"""Our causal (AR) model as a plain transformers Llama, so TRL, transformers' `generate` and other
tools take it as it is. The architectures are the same (RMSNorm, RoPE with rotate-half, SwiGLU, no
biases, an untied head); only the parameter names differ.

    llama = to_llama(model)                 # LlamaForCausalLM with the same weights
    llama.save_pretrained(folder)           # loads anywhere transformers does
"""

from __future__ import annotations

import torch

_NAMES = {
    "input_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
}


def to_llama(model) -> torch.nn.Module:
    """A LlamaForCausalLM holding a causal DiffusionTransformer's weights (logits equal, tested)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    if cfg.attention != "causal" or cfg.shift_logits:
        raise ValueError(f"only a causal model converts to Llama (this one is {cfg.attention})")
    llama_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, hidden_act="silu", **{k: getattr(cfg, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")},
    )
    llama = LlamaForCausalLM(llama_cfg)
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        parts = [_NAMES.get(p, p) for p in parts]
        key = ".".join(parts)
        state[key if key == "lm_head.weight" else f"model.{key}"] = tensor
    missing, unexpected = llama.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise ValueError(f"weights do not map onto Llama: missing {missing}, unexpected {unexpected}")
    return llama.to(next(model.parameters()).dtype).eval()
