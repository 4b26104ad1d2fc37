import json

import pytest
import torch

from onpolicy.config import DataConfig
from onpolicy.data.corpus import build_corpus, load_documents, pack, split_documents
from onpolicy.tokenizer import SpecialTokens, load_tokenizer, train_tokenizer


def test_pack_appends_eos_and_drops_remainder():
    packed = pack([[5, 6, 7], [8, 9]], seq_len=3, eos=2)
    assert packed.tolist() == [[5, 6, 7], [2, 8, 9]]  # 7 tokens -> 2 rows, the final eos dropped
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack([[1]], seq_len=8, eos=2)


def test_stdlib_source_exists_everywhere():
    docs = load_documents(DataConfig(source="stdlib", max_files=5))
    assert len(docs) == 5 and all(d.name.endswith(".py") for d in docs)
    assert all("site-packages" not in d.name for d in docs)


def test_documents_deduplicated_and_split_by_file(code_dir):
    (code_dir / "copy_of_bisect.py").write_text((code_dir / "bisect.py").read_text())
    docs = load_documents(DataConfig(source=str(code_dir)))
    texts = [d.text for d in docs]
    assert len(texts) == len(set(texts)) == 14
    train, val = split_documents(docs, 0.2)
    assert val and train and not {d.name for d in train} & {d.name for d in val}
    assert split_documents(docs, 0.2) == (train, val)  # deterministic


def test_jsonl_and_glob_sources(tmp_path, code_dir):
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"code": f"def f{i}(): return {i}\n"}) for i in range(4)))
    assert len(load_documents(DataConfig(source=str(jl), text_field="code"))) == 4
    with pytest.raises(KeyError, match="no field 'text'"):
        load_documents(DataConfig(source=str(jl)))
    assert len(load_documents(DataConfig(source=str(code_dir / "b*.py")))) == 1


def test_missing_or_empty_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_documents(DataConfig(source=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no documents"):
        load_documents(DataConfig(source=str(tmp_path / "empty")))


def test_tokenizer_roundtrip_and_special_tokens(tmp_path, code_dir):
    docs = load_documents(DataConfig(source=str(code_dir)))
    tok = train_tokenizer([d.text for d in docs], vocab_size=400)
    tok.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    special = SpecialTokens.from_tokenizer(tok)
    assert len({special.pad, special.bos, special.eos, special.mask, special.sep}) == 5
    assert special.vocab_size == len(tok) <= 400
    text = "def add(a, b):\n    return a + b  # ünïcode\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_foreign_tokenizer_gets_missing_special_tokens(tmp_path, code_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(["def f(): pass"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>").save_pretrained(tmp_path / "foreign")
    tok = load_tokenizer(tmp_path / "foreign")
    special = SpecialTokens.from_tokenizer(tok)
    assert tok.convert_ids_to_tokens(special.eos) == "</s>"  # its own eos is kept
    assert tok.convert_ids_to_tokens(special.mask) == "<|mask|>"
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_corpus_cache_key_changes_with_inputs(tmp_path, code_dir):
    cfg = DataConfig(source=str(code_dir), seq_len=64, cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    docs = load_documents(cfg)
    tok = train_tokenizer([d.text for d in docs], vocab_size=400)
    a = build_corpus(cfg, tok)
    assert a.train.shape[1] == 64 and a.val.numel() > 0
    b = build_corpus(cfg, tok)  # from cache
    assert b.meta["key"] == a.meta["key"] and torch.equal(a.train[:], b.train[:])
    (code_dir / "new.py").write_text("x = 1\n" * 50)
    assert build_corpus(cfg, tok).meta["key"] != a.meta["key"]
    cfg.seq_len = 32
    assert build_corpus(cfg, tok).meta["key"] != a.meta["key"]
    assert len(list((tmp_path / "cache" / "corpus").glob("*/meta.json"))) == 3
    assert not list((tmp_path / "cache" / "corpus").glob(".*"))  # no temporary folders left


def test_memory_mapped_shards_give_the_packed_corpus_batches(tmp_path, code_dir):
    """The shards hold exactly what pack() makes in memory, as uint16, and batch_rows picks the same
    int64 batches from either; a damaged shard is refused and rebuilt, not half-read."""
    from onpolicy.data.corpus import TokenArray
    from onpolicy.tokenizer import SpecialTokens
    from onpolicy.trainers.common import batch_rows

    cfg = DataConfig(source=str(code_dir), seq_len=32, cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    docs = load_documents(cfg)
    tok = train_tokenizer([d.text for d in docs], vocab_size=400)
    corpus = build_corpus(cfg, tok, docs)
    train_docs, _ = split_documents(docs, cfg.val_fraction)
    ids = tok([d.text for d in train_docs], add_special_tokens=False)["input_ids"]
    packed = pack(ids, cfg.seq_len, SpecialTokens.from_tokenizer(tok).eos)
    assert isinstance(corpus.train, TokenArray) and corpus.meta["dtype"] == "uint16"
    assert corpus.train.shape == tuple(packed.shape)
    cached = tmp_path / "cache" / "corpus" / corpus.meta["key"] / "train.bin"
    assert cached.stat().st_size == packed.numel() * 2
    for step in range(6):
        rows = batch_rows(step, 0, 0, 1, 4, 1, packed.shape[0], seed=3)
        got = corpus.train[rows]
        assert got.dtype == torch.int64 and torch.equal(got, packed[rows])
    assert torch.equal(corpus.val[0:2], corpus.val[torch.tensor([0, 1])])
    shard = tmp_path / "cache" / "corpus" / corpus.meta["key"] / "train.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # a torn shard
    with pytest.raises(ValueError, match="expected .* bytes"):
        TokenArray(shard, corpus.meta["train_rows"], 32, "uint16")
    rebuilt = build_corpus(cfg, tok, docs)
    assert torch.equal(rebuilt.train[:], packed)


def test_task_fraction_mixes_generated_tasks_into_the_corpus(code_dir):
    base = load_documents(DataConfig(source=str(code_dir)))
    mixed = load_documents(DataConfig(source=str(code_dir), task_fraction=0.3))
    tasks = [d for d in mixed if d.name.startswith("generated/train/")]
    assert mixed[: len(base)] == base and len(mixed) == len(base) + len(tasks)
    share = sum(len(d.text) for d in tasks) / sum(len(d.text) for d in mixed)
    assert 0.3 <= share < 0.31
    assert "def solve(xs):" in tasks[0].text and "return" in tasks[0].text
