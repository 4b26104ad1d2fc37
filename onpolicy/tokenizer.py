"""Byte-level BPE tokenizer: train one on a corpus, or load any local HF tokenizer folder.

Special tokens are resolved exactly once, into `SpecialTokens`; nothing else in the project
hard-codes a token id (no magic numbers: docs/architecture.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from onpolicy.files import publish, temporary_sibling
from onpolicy.special_tokens import BOS, EOS, MASK, PAD, SEP, SpecialTokens  # noqa: F401 (re-exported)


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


def has_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds an HF tokenizer of its own."""
    return (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists()


def load_tokenizer(path: str | Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Load a local HF tokenizer folder (or the tokenizer inside a GGUF file there) and add whichever of
    our special tokens it lacks. A pad token that is the EOS token (as in SmolLM2) is replaced by our
    own: padding is never predicted, EOS must be."""
    path = Path(path)
    if gguf_file is None and not has_tokenizer(path):
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
    """A short hash of what maps text to ids: the vocabulary (every token and its id, added tokens
    included) and, for BPE, the merges. Two tokenizers with the same vocabulary size but other tokens
    differ. Used in data cache keys and to refuse a tokenizer that is not the model's own."""
    import hashlib

    payload = {"vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1])}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        payload["merges"] = json.loads(backend.to_str()).get("model", {}).get("merges")
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def check_same_tokenizer(tok: PreTrainedTokenizerBase, model_tok: PreTrainedTokenizerBase, where: str,
                         model: str) -> None:
    """Refuse `tok` (from `where`) when it is not the tokenizer of `model`: compared by content."""
    from onpolicy.errors import ConfigError

    mine, theirs = tokenizer_fingerprint(tok), tokenizer_fingerprint(model_tok)
    if mine != theirs:
        raise ConfigError(
            f"{where} (tokenizer {mine}, {len(tok)} tokens) is not the tokenizer of model.init_from={model} "
            f"({theirs}, {len(model_tok)} tokens): the model would read wrong token ids. Unset "
            "tokenizer.path to "
            "use the model's own tokenizer"
        )


def prepare_tokenizer(path: str | None, vocab_size: int, texts: list[str], cache_dir: str | Path,
                      max_mb: float):
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
