"""Stage 3, constrained-order distillation: selection, the pool file, the loss, and a toy run end to end."""

import json
import math

import pytest
import torch

from onpolicy.errors import ConfigError
from onpolicy.trainers.order import order_loss, read_pool, select

from .conftest import run_cli


def test_selection_prefers_verified_then_highest_elbo():
    rows = [{"passed": False, "elbo": -0.1}, {"passed": True, "elbo": -2.0}, {"passed": True, "elbo": -1.0},
            {"passed": False, "elbo": -0.5}]
    assert select(rows, 1, True) == [rows[2]]
    assert select(rows, 2, True) == [rows[2], rows[1]]
    assert select(rows, 3, True) == [rows[2], rows[1]]  # only verified ones
    assert select(rows, 3, False) == [rows[2], rows[1], rows[0]]  # then failing ones by ELBO
    assert select([rows[0]], 1, True) == []


def test_selection_can_prefer_the_fastest_verified_trajectory():
    rows = [{"passed": True, "path_logp": -0.5, "forwards": 30},
            {"passed": True, "path_logp": -2.0, "forwards": 12},
            {"passed": False, "path_logp": -0.1, "forwards": 5},
            {"passed": True, "path_logp": -1.0, "forwards": 12}]
    assert select(rows, 1, True, prefer="fast") == [rows[3]]  # fewest forwards, ties by likelihood
    assert select(rows, 3, True, prefer="fast") == [rows[3], rows[1], rows[0]]
    assert select(rows, 1, True, prefer="likely") == [rows[0]]


def test_order_loss_hand_computed():
    """-mean log p of the committed tokens: positions 0, 1 of row 0 and 0 of row 1 committed."""
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.8, 0.1, 0.1]]))
    committed = torch.tensor([[True, True, False], [True, False, False]])
    loss, stats = order_loss(logp, committed)
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.25) + math.log(0.8)) / 3, rel=1e-6)
    assert stats["tokens"].item() == 3


def test_bad_pool_files_are_named_with_their_line(tmp_path):
    path = tmp_path / "pool.jsonl"
    with pytest.raises(ConfigError, match="pool file not found"):
        read_pool(path)
    path.write_text('{"format": "onpolicy-trajectory-pool/1"}\n{"task_id": "a"\n')
    with pytest.raises(ConfigError, match=r"pool.jsonl:2: not valid JSON"):
        read_pool(path)
    path.write_text('{"format": "something else"}\n')
    with pytest.raises(ConfigError, match=r":1: not a trajectory pool"):
        read_pool(path)
    path.write_text('{"format": "onpolicy-trajectory-pool/1"}\n{"task_id": "a"}\n')
    with pytest.raises(ConfigError, match=r":2: a pool row needs"):
        read_pool(path)


@pytest.mark.slow
def test_stage3_builds_a_reusable_pool_and_distills_it(init_model, tmp_path):
    """A toy run: the pool is sampled, judged (a coin verifier: half pass), the best kept and written
    with what made it; distillation moves the weights; a second run reuses the pool file."""
    common = [f"model.init_from={init_model}", "pool.n_tasks=6", "pool.samples=3", "pool.keep=1",
              "pool.batch_size=6", "pool.sampler.max_new_tokens=12",
              "pool.verifier=tests.plugins:CoinVerifier", "validation.n_tasks=2", "train.max_steps=3",
              "train.micro_batch_size=2", "train.lr=3e-3", "train.warmup_steps=1", "logging.progress=false",
              "logging.log_every=1"]
    out = tmp_path / "order"
    r = run_cli("train", "recipes/tiny/stage3_order.yaml", *common, f"logging.output_dir={out}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    header, kept = read_pool(out / "pool.jsonl")
    assert (header["model"] == str(init_model) and header["samples"] == 3
            and header["sampler"]["max_new_tokens"] == 12)
    assert header["decoded"] == 18 and 0 < header["kept"] == len(kept) <= 6
    assert all(row["passed"] for row in kept)
    assert len({row["task_id"] for row in kept}) == len(kept)  # at most `keep` per prompt
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    from safetensors.torch import load_file

    before = load_file(str(init_model / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # reuse: another run distills the same file without sampling
    again = tmp_path / "again"
    r = run_cli("train", "recipes/tiny/stage3_order.yaml", *common, f"logging.output_dir={again}",
                f"pool.path={out / 'pool.jsonl'}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "trajectories kept (made by" in r.stdout + r.stderr and not (again / "pool.jsonl").exists()
