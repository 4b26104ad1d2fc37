"""The special tokens every stage needs, resolved once from a tokenizer (no magic numbers:
docs/architecture.md).

Pure Python with no package imports: the sampler imports it relatively, so an exported model folder
carries it beside `sampling.py` and decodes where onpolicy is not installed (`onpolicy.export`).
"""

from __future__ import annotations

from dataclasses import dataclass

# Names of the special tokens a tokenizer trained by us carries. A loaded tokenizer keeps its own
# tokens where it has them (e.g. Llama's eos) and gets only the missing ones added.
PAD, BOS, EOS, MASK, SEP = "<|pad|>", "<|bos|>", "<|eos|>", "<|mask|>", "<|sep|>"


@dataclass(frozen=True)
class SpecialTokens:
    """The ids every stage needs, read once from the tokenizer."""

    pad: int
    bos: int
    eos: int
    mask: int
    sep: int
    vocab_size: int  # len(tokenizer): the model's embedding rows

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialTokens:
        ids = {
            "pad": tok.pad_token_id,
            "bos": tok.bos_token_id,
            "eos": tok.eos_token_id,
            "mask": tok.mask_token_id,
            "sep": tok.convert_tokens_to_ids(SEP),
        }
        missing = [k for k, v in ids.items() if v is None or v == tok.unk_token_id and k != "pad"]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; load it with "
                             "onpolicy.tokenizer.load_tokenizer")
        return cls(**ids, vocab_size=len(tok))
