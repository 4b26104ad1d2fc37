"""The real entry point (`onpolicy train`) end to end at toy size, in subprocesses."""

import json

import pytest
import torch
from transformers import AutoModel

import onpolicy.model  # noqa: F401  (registers the Auto classes)

from .conftest import run_cli

TINY = [
    "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.block_size=16",
    "tokenizer.vocab_size=400", "data.seq_len=64", "data.val_fraction=0.2", "train.micro_batch_size=4",
    "train.lr=3e-3", "train.warmup_steps=2", "train.eval_batches=2", "train.eval_every=0",
    "logging.log_every=1", "logging.progress=false",
]


def train(recipe, out, code_dir, cache, *extra, env=None):
    r = run_cli("train", recipe, *TINY, f"data.source={code_dir}", f"data.cache_dir={cache}",
                f"logging.output_dir={out}", *extra, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_stage1_trains_exports_and_samples(tmp_path, code_dir):
    out = tmp_path / "run"
    train("recipes/tiny/stage1_mask.yaml", out, code_dir, tmp_path / "cache", "train.max_steps=20")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss_end"] < summary["val_loss_start"] - 0.3
    model = AutoModel.from_pretrained(out / "final")
    assert model.config.attention == "block_causal"
    assert (out / "final" / "tokenizer.json").exists()
    r = run_cli("sample", str(out), "--prompt", "def add(a, b):", "--max-new-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def add(a, b):") and "tokens in" in r.stderr


def test_ar_baseline_recipe_trains(tmp_path, code_dir):
    out = tmp_path / "ar"
    train("recipes/tiny/ar_baseline.yaml", out, code_dir, tmp_path / "cache", "train.max_steps=8", "logging.wandb=offline")
    summary = json.loads((out / "summary.json").read_text())
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run written beside the metrics"
    assert summary["val_loss_end"] < summary["val_loss_start"]
    assert AutoModel.from_pretrained(out / "final").config.attention == "causal"


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, code_dir):
    cache = tmp_path / "cache"
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("train.max_steps=6", "train.save_every=3")
    train("recipes/tiny/stage1_mask.yaml", straight, code_dir, cache, *common)
    train("recipes/tiny/stage1_mask.yaml", split, code_dir, cache, *common, "train.stop_at_step=3")
    assert not (split / "final").exists() and (split / "checkpoints" / "step_00000003" / "MANIFEST.json").exists()
    r = train("recipes/tiny/stage1_mask.yaml", split, code_dir, cache, *common)
    assert "resumed at step 3" in r.stdout + r.stderr
    a, b = losses(straight), losses(split)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # exactly: same data, noise, state
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (straight, split))
    assert sa["val_loss_end"] == sb["val_loss_end"]
    x = torch.randint(5, 300, (1, 32))
    ma, mb = (AutoModel.from_pretrained(d / "final").eval() for d in (straight, split))
    torch.testing.assert_close(ma(x).logits, mb(x).logits, rtol=0, atol=0)


def test_corrupt_checkpoint_is_detected_not_loaded(tmp_path, code_dir):
    out, cache = tmp_path / "run", tmp_path / "cache"
    train("recipes/tiny/stage1_mask.yaml", out, code_dir, cache, "train.max_steps=4", "train.stop_at_step=2")
    ckpt = out / "checkpoints" / "step_00000002"
    victim = next(p for p in sorted(ckpt.rglob("*.pt")))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = run_cli("train", "recipes/tiny/stage1_mask.yaml", *TINY, f"data.source={code_dir}", f"data.cache_dir={cache}",
                f"logging.output_dir={out}", "train.max_steps=4")
    assert r.returncode == 2
    assert "corrupt" in r.stderr and victim.name in r.stderr and "Traceback" not in r.stderr


def test_truncated_export_is_detected(tmp_path, make_model):
    from onpolicy.errors import CheckpointError
    from onpolicy.loading import load_pretrained

    make_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_pretrained(tmp_path)


def test_ar_to_diffusion_initialisation(tmp_path, code_dir):
    """A causal baseline continued as block-causal mask diffusion from its own weights."""
    cache = tmp_path / "cache"
    train("recipes/tiny/ar_baseline.yaml", tmp_path / "ar", code_dir, cache, "train.max_steps=4")
    r = train("recipes/tiny/stage1_mask.yaml", tmp_path / "diff", code_dir, cache, "train.max_steps=4",
              f"model.init_from={tmp_path / 'ar' / 'final'}")
    ar = AutoModel.from_pretrained(tmp_path / "ar" / "final")
    diff = AutoModel.from_pretrained(tmp_path / "diff" / "final")
    assert ar.config.attention == "causal" and diff.config.attention == "block_causal"
    assert diff.config.block_size == 16
    assert "attention=block_causal" in r.stdout + r.stderr
