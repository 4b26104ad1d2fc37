"""Weight-for-weight conversions between our `DiffusionTransformer` and transformers' causal LMs.

- `from_causal_lm`: a Llama-, Mistral- or Qwen2-architecture causal LM (a local folder, a Hub id, a
  .gguf file, or `smollm2`) becomes a DiffusionTransformer in causal mode whose logits equal the
  original's; set its attention to block_causal (with `shift_logits`, as Dream does) and it continues
  as block diffusion (`model.init_from` of any recipe, e.g. recipes/tiny/adapt_smollm2.yaml).
- `to_llama`: a causal DiffusionTransformer (our AR baseline) as a plain `LlamaForCausalLM`, so
  transformers' `generate`, TRL and other tools take it as it is.

The two architectures are the same network (RoPE with rotate-half, RMSNorm, SwiGLU, grouped-query
attention, untied or tied head); only the parameter names differ (`PARAM_NAMES`). What does not map
(rope scaling, sliding windows, MLP biases, a head size other than hidden / heads) is refused by name.

New special tokens (our mask, pad and sep, added by `load_tokenizer` when the model lacks them) get
embedding rows at the mean of the existing ones, as transformers' `resize_token_embeddings` does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from onpolicy.model import DiffusionTransformer, DiffusionTransformerConfig

SUPPORTED = ("llama", "mistral", "qwen2")
# ours -> transformers' Llama / Qwen2 names ({i} = layer index)
PARAM_NAMES = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.input_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    **{f"layers.{{i}}.self_attn.{p}_proj.{w}": f"model.layers.{{i}}.self_attn.{p}_proj.{w}" for p in "qkvo"
       for w in ("weight", "bias")},
    **{f"layers.{{i}}.mlp.{p}_proj.weight": f"model.layers.{{i}}.mlp.{p}_proj.weight"
       for p in ("gate", "up", "down")},
}


def _rename(name: str, table: dict[str, str]) -> str:
    match = re.match(r"^(.*?layers\.)(\d+)(\..*)$", name)
    key, layer = (name, None) if match is None else (f"{match.group(1)}{{i}}{match.group(3)}", match.group(2))
    if key not in table:
        raise KeyError(f"no counterpart for parameter '{name}'")
    return table[key].replace("{i}", layer) if layer is not None else table[key]


def _rope_theta(cfg) -> float:
    """rope_theta of a transformers config (v5 keeps it in rope_parameters), refusing scaled RoPE."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"rope type '{kind}' (scaled RoPE) is not supported; DiffusionTransformer uses "
                         "plain RoPE")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def diffusion_config_from(cfg, vocab_size: int, special) -> DiffusionTransformerConfig:
    """Our config for a transformers Llama / Mistral / Qwen2 config (causal attention)."""
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"model_type '{kind}' cannot be converted; supported: {', '.join(SUPPORTED)}")
    heads = cfg.num_attention_heads
    if getattr(cfg, "head_dim", None) not in (None, cfg.hidden_size // heads):
        raise ValueError(f"head_dim={cfg.head_dim} differs from hidden_size / num_attention_heads; not "
                         "supported")
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        raise ValueError("only SwiGLU MLPs with silu and no bias are supported")
    if (getattr(cfg, "use_sliding_window", False)
            or (kind == "mistral" and getattr(cfg, "sliding_window", None))):
        raise ValueError("sliding-window attention is not supported")
    llama_bias = bool(getattr(cfg, "attention_bias", False))
    return DiffusionTransformerConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=_rope_theta(cfg), rms_norm_eps=cfg.rms_norm_eps, attention="causal", block_size=1,
        attention_bias=kind == "qwen2" or llama_bias, attention_out_bias=llama_bias,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        mask_token_id=special.mask, pad_token_id=special.pad, bos_token_id=special.bos,
        eos_token_id=special.eos,
    )


def from_causal_lm(lm: torch.nn.Module, tokenizer) -> DiffusionTransformer:
    """The DiffusionTransformer (causal mode) holding `lm`'s weights; rows for tokens the tokenizer
    added beyond the model's vocabulary start at the mean embedding."""
    from onpolicy.tokenizer import SpecialTokens

    special = SpecialTokens.from_tokenizer(tokenizer)
    vocab = max(special.vocab_size, lm.get_input_embeddings().weight.shape[0])
    model = DiffusionTransformer(diffusion_config_from(lm.config, vocab, special))
    theirs = {k: v.detach().float() for k, v in lm.state_dict().items() if "rotary_emb" not in k}
    state = {}
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        source = _rename(name, PARAM_NAMES)
        if source not in theirs:
            raise KeyError(f"{type(lm).__name__} has no '{source}' (for our '{name}')")
        value = theirs.pop(source)
        if value.shape != param.shape:  # embedding / head rows for the added special tokens
            if value.shape[1:] != param.shape[1:] or value.shape[0] > param.shape[0]:
                raise ValueError(f"'{source}' has shape {tuple(value.shape)}, ours {tuple(param.shape)}")
            extra = value.mean(0, keepdim=True).expand(param.shape[0] - value.shape[0], *value.shape[1:])
            value = torch.cat([value, extra])
        state[name] = value
    theirs.pop("lm_head.weight", None)  # tied: the embedding
    if theirs:
        raise KeyError(f"parameters without a counterpart: {sorted(theirs)[:5]}")
    model.load_state_dict(state, strict=not model.config.tie_word_embeddings)
    model.tie_weights()
    return model


def to_llama(model: DiffusionTransformer):
    """Our causal model as a transformers `LlamaForCausalLM` with the same weights and logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    if c.attention != "causal" or c.shift_logits:
        raise ValueError(f"only a causal (AR) model exports as Llama; this one is {c.attention}")
    if c.attention_bias != c.attention_out_bias:
        raise ValueError("Llama has one attention_bias for q, k, v and o; this model's differ (a Qwen2 "
                         "conversion)")
    llama = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, attention_bias=c.attention_bias,
        hidden_act="silu", tie_word_embeddings=c.tie_word_embeddings,
        **{k: getattr(c, k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")},
    )
    lm = LlamaForCausalLM(llama)
    state = {_rename(k, PARAM_NAMES): v.detach().cpu().clone() for k, v in model.state_dict().items()}
    missing, unexpected = lm.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k
               and not (k == "lm_head.weight" and c.tie_word_embeddings)]
    if missing or unexpected:
        raise KeyError(f"Llama conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return lm.to(next(model.parameters()).dtype).eval()


def load_causal(spec: str | Path):
    """(DiffusionTransformer in causal mode, tokenizer) from an outside causal LM: an HF folder, a Hub
    id, a .gguf file or `smollm2` (see onpolicy.hf_causal.load_hf_causal)."""
    from onpolicy.hf_causal import load_hf_causal

    lm, tokenizer = load_hf_causal(spec)
    return from_causal_lm(lm, tokenizer), tokenizer
