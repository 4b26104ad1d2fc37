"""Byte-level BPE tokenizer: train one on a corpus, or load any local HF tokenizer folder.

Special tokens are resolved exactly once, into `SpecialTokens`; nothing else in the project
hard-codes a token id (STYLE.md: no magic numbers).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from onpolicy.files import publish, temporary_sibling

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
    def from_tokenizer(cls, tok: PreTrainedTokenizerBase) -> SpecialTokens:
        ids = {
            "pad": tok.pad_token_id,
            "bos": tok.bos_token_id,
            "eos": tok.eos_token_id,
            "mask": tok.mask_token_id,
            "sep": tok.convert_tokens_to_ids(SEP),
        }
        missing = [k for k, v in ids.items() if v is None or v == tok.unk_token_id and k != "pad"]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; load it with onpolicy.tokenizer.load_tokenizer")
        return cls(**ids, vocab_size=len(tok))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style: every byte is representable, no unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS, MASK, SEP]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        mask_token=MASK,
        additional_special_tokens=[SEP],
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Load a local HF tokenizer folder (or the tokenizer inside a GGUF file there) and add whichever of
    our special tokens it lacks. A pad token that is the EOS token (as in SmolLM2) is replaced by our
    own: padding is never predicted, EOS must be."""
    path = Path(path)
    if gguf_file is None and not (path / "tokenizer_config.json").exists() and not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer at {path} (expected tokenizer.json or tokenizer_config.json)")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kw)
    add: dict = {}
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        add["pad_token"] = PAD
    if tok.bos_token is None:
        add["bos_token"] = BOS
    if tok.eos_token is None:
        add["eos_token"] = EOS
    if tok.mask_token is None:
        add["mask_token"] = MASK
    if SEP not in tok.get_vocab():
        add["additional_special_tokens"] = [SEP]
    if add:
        tok.add_special_tokens(add)
    return tok


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary and merges, used in data cache keys."""
    import hashlib

    backend = getattr(tok, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def prepare_tokenizer(path: str | None, vocab_size: int, texts: list[str], cache_dir: str | Path, max_mb: float):
    """The tokenizer a run uses: `path` if given, else a BPE trained on `texts` (cached by content)."""
    import hashlib

    if path is not None:
        return load_tokenizer(path)
    h = hashlib.sha256(f"{vocab_size}|{max_mb}".encode())
    for t in texts:
        h.update(hashlib.sha1(t.encode()).digest())
    folder = Path(cache_dir) / "tokenizers" / h.hexdigest()[:20]
    if (folder / "tokenizer.json").exists():
        return load_tokenizer(folder)
    budget, chosen = int(max_mb * 2**20), []
    for t in texts:  # the first max_mb of text (texts come sorted, so this is deterministic)
        if budget <= 0:
            break
        chosen.append(t)
        budget -= len(t)
    tok = train_tokenizer(chosen, vocab_size)
    tmp = temporary_sibling(folder)
    tok.save_pretrained(str(tmp))
    publish(tmp, folder, lambda f: (f / "tokenizer.json").is_file())  # atomic, race-safe across processes
    return load_tokenizer(folder)
