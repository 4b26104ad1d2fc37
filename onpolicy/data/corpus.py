"""Code corpus -> deduplicated documents -> train/validation split by file -> packed token shards.

Default source: the Python source of the running interpreter's standard library (found through
`sysconfig`, so it exists on every machine; it is under the PSF license, see NOTICE). Also: any
folder or glob of code files, or a JSONL file with a text field. Tokenized corpora are cached on
disk under a key that changes when the documents, the tokenizer or the packing change.

On disk a corpus is a folder `<cache_dir>/corpus/<key>/` holding `train.bin` and `val.bin` (the
packed rows, row after row, uint16 when the vocabulary fits, else int32) and `meta.json`. Training
processes memory-map the shards (`TokenArray`): every rank on a machine shares the same page-cache
pages, and a process's private memory does not grow with the corpus. `onpolicy prepare-data RECIPE`
builds them ahead of a run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onpolicy.config import DataConfig
from onpolicy.files import publish, temporary_sibling


@dataclass(frozen=True)
class Document:
    name: str  # file path or "<jsonl>:<line>"
    text: str


class TokenArray:
    """[rows, seq_len] token ids in a memory-mapped file; indexing returns int64 tensors (what a
    packed corpus in memory returned), reading only the rows asked for."""

    def __init__(self, path: str | Path, rows: int, seq_len: int, dtype: str):
        self.path = Path(path)
        expected = rows * seq_len * np.dtype(dtype).itemsize
        if not self.path.is_file() or self.path.stat().st_size != expected:
            found = self.path.stat().st_size if self.path.is_file() else "no file"
            raise ValueError(f"corpus shard {self.path}: expected {expected} bytes ({rows} x {seq_len} "
                             f"{dtype}), found {found}")
        self._data = np.memmap(self.path, dtype=dtype, mode="r", shape=(rows, seq_len))

    @property
    def shape(self) -> tuple[int, int]:
        return self._data.shape

    def __len__(self) -> int:
        return self._data.shape[0]

    def numel(self) -> int:
        return self._data.size

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        return torch.from_numpy(np.asarray(self._data[index], dtype=np.int64))

    @staticmethod
    def write(path: Path, tokens: torch.Tensor, vocab_size: int) -> str:
        """Write [rows, seq_len] ids as a shard; returns its dtype (uint16 where the vocabulary fits)."""
        dtype = "uint16" if vocab_size <= 1 << 16 else "int32"
        tokens.numpy().astype(dtype).tofile(path)
        return dtype


@dataclass
class PackedCorpus:
    train: TokenArray  # [n_train, seq_len]: rows come back as int64 tensors
    val: TokenArray  # [n_val, seq_len]
    meta: dict


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_files(paths: list[Path], cfg: DataConfig) -> list[Document]:
    docs = []
    for p in paths:
        if any(part in cfg.exclude for part in p.parts):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # test fixtures with other encodings, unreadable files: not code we want
        if text.strip():
            docs.append(Document(str(p), text))
    return docs


def load_documents(cfg: DataConfig) -> list[Document]:
    """Read the configured source into documents, sorted by name, exact duplicates removed."""
    source = cfg.source
    if source == "stdlib":
        root = stdlib_root()
        paths = sorted(p for ext in cfg.extensions for p in root.rglob(f"*{ext}"))
        docs = _read_files(paths, cfg)
    elif source.endswith(".jsonl"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"data.source: JSONL file not found: {path}")
        docs = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                row = json.loads(line)
                if cfg.text_field not in row:
                    raise KeyError(f"{path}:{i + 1}: no field '{cfg.text_field}' (set data.text_field; "
                                   f"fields: {sorted(row)})")
                if str(row[cfg.text_field]).strip():
                    docs.append(Document(f"{path}:{i + 1}", str(row[cfg.text_field])))
    elif Path(source).is_dir():
        root = Path(source)
        paths = sorted(p for ext in cfg.extensions for p in root.rglob(f"*{ext}") if p.is_file())
        docs = _read_files(paths, cfg)
    elif glob.has_magic(source):
        docs = _read_files(sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file()),
                           cfg)
    else:
        raise FileNotFoundError(f"data.source: no such folder, glob or .jsonl file: {source}")

    seen: set[str] = set()
    unique = []
    for doc in sorted(docs, key=lambda d: d.name):
        digest = hashlib.sha1(doc.text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            unique.append(doc)
    if cfg.max_files is not None:
        unique = unique[: cfg.max_files]
    if not unique:
        hidden = [part for part in cfg.exclude if part in Path(str(source)).parts]
        if hidden:
            raise ValueError(f"data.source '{source}' lies inside '{hidden[0]}', which data.exclude skips; "
                             f"set data.exclude to the parts to skip (e.g. data.exclude=[__pycache__])")
        raise ValueError(f"data.source '{source}' holds no documents (extensions {cfg.extensions}, excluding "
                         f"{cfg.exclude})")
    return unique + task_documents(cfg, sum(len(d.text) for d in unique))


def task_documents(cfg: DataConfig, corpus_chars: int) -> list[Document]:
    """Generated train tasks (prompt + reference solution) making up `task_fraction` of the text."""
    if cfg.task_fraction <= 0:
        return []
    from onpolicy.data.generated import generate_tasks

    want = cfg.task_fraction / (1.0 - cfg.task_fraction) * corpus_chars
    # Generated tasks average ~250 characters; generating a few more than needed is cheap (the
    # generator is deterministic, so a shorter list is a prefix of a longer one).
    tasks = generate_tasks("train", min(cfg.max_tasks, int(want / 150) + 10), seed=cfg.task_seed)
    docs, chars = [], 0
    for t in tasks:
        if chars >= want:
            break
        docs.append(Document(t.task_id, t.prompt + t.canonical_solution))
        chars += len(docs[-1].text)
    return docs


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Split by file, by a hash of the name: stable when files are added or removed."""
    def bucket(d: Document) -> float:
        return int(hashlib.sha1(d.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    train = [d for d in docs if bucket(d) >= val_fraction]
    val = [d for d in docs if bucket(d) < val_fraction]
    if not val:  # tiny corpora: hold out the last file rather than nothing
        train, val = train[:-1], train[-1:]
    if not train:
        raise ValueError(f"only {len(docs)} document(s): too few to split into train and validation")
    return train, val


def pack(token_lists: list[list[int]], seq_len: int, eos: int) -> torch.Tensor:
    """Concatenate documents, each followed by EOS, and cut into [n, seq_len] (remainder dropped)."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        flat.append(eos)
    n = len(flat) // seq_len
    if n == 0:
        raise ValueError(f"corpus has {len(flat)} tokens: fewer than one sequence of data.seq_len={seq_len}")
    return torch.tensor(flat[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def corpus_key(docs: list[Document], tokenizer_fp: str, cfg: DataConfig) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode() + b"\0" + hashlib.sha1(d.text.encode()).digest())
    h.update(f"{tokenizer_fp}|{cfg.seq_len}|{cfg.val_fraction}".encode())
    return h.hexdigest()[:20]


def open_corpus(folder: Path) -> PackedCorpus:
    """Memory-map a corpus folder written by build_corpus."""
    meta = json.loads((folder / "meta.json").read_text())
    seq_len, dtype = meta["seq_len"], meta["dtype"]
    return PackedCorpus(TokenArray(folder / "train.bin", meta["train_rows"], seq_len, dtype),
                        TokenArray(folder / "val.bin", meta["val_rows"], seq_len, dtype), meta)


def build_corpus(cfg: DataConfig, tokenizer, docs: list[Document] | None = None) -> PackedCorpus:
    """Tokenize and pack the corpus into memory-mapped shards, or map the cached ones if nothing changed.

    Safe for several processes at once (one per node on node-local disks, or all of them on a shared
    one): each writes into its own temporary folder and renames it into place; a folder that is
    already there wins, and is complete by construction."""
    from onpolicy.tokenizer import SpecialTokens, tokenizer_fingerprint

    docs = docs if docs is not None else load_documents(cfg)
    key = corpus_key(docs, tokenizer_fingerprint(tokenizer), cfg)
    folder = Path(cfg.cache_dir) / "corpus" / key
    try:
        return open_corpus(folder)
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        pass  # not built yet, or damaged: (re)build it below
    special = SpecialTokens.from_tokenizer(tokenizer)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)

    def encode(ds: list[Document]) -> list[list[int]]:
        return tokenizer([d.text for d in ds], add_special_tokens=False)["input_ids"]

    train, val = pack(encode(train_docs), cfg.seq_len, special.eos), pack(encode(val_docs), cfg.seq_len,
                                                                          special.eos)
    tmp = temporary_sibling(folder)
    dtype = TokenArray.write(tmp / "train.bin", train, special.vocab_size)
    TokenArray.write(tmp / "val.bin", val, special.vocab_size)
    meta = {
        "key": key,
        "source": cfg.source,
        "train_files": len(train_docs),
        "val_files": len(val_docs),
        "train_tokens": train.numel(),
        "val_tokens": val.numel(),
        "train_rows": train.shape[0],
        "val_rows": val.shape[0],
        "seq_len": cfg.seq_len,
        "dtype": dtype,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    publish(tmp, folder, _is_complete)
    return open_corpus(folder)


def _is_complete(folder: Path) -> bool:
    try:
        open_corpus(folder)
        return True
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return False
