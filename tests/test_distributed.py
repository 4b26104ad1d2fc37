"""Two ranks on CPU (gloo) through DeepSpeed ZeRO-2 and ZeRO-3: `scripts/test.sh -m distributed`."""

import json

import pytest
import torch
from transformers import AutoModel

import onpolicy.model  # noqa: F401  (registers the Auto classes)

from .conftest import run_cli
from .test_train import TINY

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_rank_zero_trains_with_falling_loss(tmp_path, code_dir, zero):
    out = tmp_path / zero
    r = run_cli("train", "recipes/tiny/stage1_mask.yaml", "--nproc", "2", *TINY, f"data.source={code_dir}",
                f"data.cache_dir={tmp_path / 'cache'}", f"logging.output_dir={out}", "train.max_steps=16",
                "train.save_every=8", f"train.deepspeed=recipes/deepspeed/{zero}.json", "train.threads=1")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "world=2" in r.stdout + r.stderr and f"ZeRO-{zero[-1]}" in r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_loss_end"] < summary["val_loss_start"] - 0.3
    # the exported model holds the full (gathered) weights and loads on one process
    model = AutoModel.from_pretrained(out / "final").eval()
    assert torch.isfinite(model(torch.randint(5, 300, (1, 32))).logits).all()
    assert sum(p.numel() for p in model.parameters()) == summary["params"]
