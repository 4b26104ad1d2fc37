"""onpolicy installed as a package (not editable, not the checkout): recipes and DeepSpeed configs
ship inside it, `onpolicy recipes` lists and copies them, and a recipe trains from another folder."""

import json
import os
import site
import subprocess
import sys

import pytest

from .conftest import ROOT


def test_recipes_are_listed_found_and_copied(tmp_path):
    from onpolicy.recipes import copy_recipe, find_recipe, list_recipes

    names = dict(list_recipes())
    assert "tiny/stage1_mask" in names and "deepspeed/zero2.json" in names
    assert names["tiny/lora_domain"].startswith("onpolicy train recipes/tiny/lora_domain.yaml")
    assert find_recipe("tiny/stage1_mask").resolve() == find_recipe("recipes/tiny/stage1_mask.yaml").resolve()
    written = copy_recipe("tiny/stage1_mask", tmp_path)
    assert written.read_text() == find_recipe("tiny/stage1_mask").read_text()
    with pytest.raises(FileExistsError):
        copy_recipe("tiny/stage1_mask", tmp_path)
    with pytest.raises(FileNotFoundError, match="onpolicy recipes"):
        find_recipe("tiny/no_such_recipe")


def test_huggingface_style_auto_fields_are_filled_not_passed_through(tmp_path):
    from onpolicy.engine import deepspeed_config

    hf = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "bf16": {"enabled": "auto"},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "weight_decay": "auto"}},
          "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto"}},
          "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                "stage3_prefetch_bucket_size": "auto",
                                "stage3_param_persistence_threshold": "auto"}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(hf))
    cfg = deepspeed_config(str(path), 4, 2, 2, 1.0, "bf16", hidden_size=64)
    assert cfg["train_batch_size"] == 16 and cfg["bf16"] == {"enabled": True}
    assert "optimizer" not in cfg and "scheduler" not in cfg  # train.* define them
    zero = cfg["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096 and zero["stage3_prefetch_bucket_size"] == 3686
    assert zero["stage3_param_persistence_threshold"] == 640
    hf["optimizer"]["params"]["lr"] = 3e-4
    path.write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"optimizer.params \['lr'\] are set from the recipe"):
        deepspeed_config(str(path), 4, 2, 2, 1.0, "bf16", hidden_size=64)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}))
    with pytest.raises(ValueError, match="zero_optimization.sub_group_size"):
        deepspeed_config(str(path), 4, 2, 2, 1.0, "fp32")


@pytest.mark.slow
def test_pip_install_then_recipes_and_train_from_another_folder(tmp_path, code_dir):
    """A fresh virtual environment gets onpolicy by `pip install .` (a wheel, not editable); its
    dependencies come from this environment's site-packages (no download), where the editable
    checkout is not active (.pth files there are not run)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in site.getsitepackages() if os.path.isdir(p)]
    with open(os.path.join(purelib, "deps.pth"), "w") as f:  # plain paths: no editable finder of the checkout
        f.write("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", str(ROOT)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(py), "-c", "import onpolicy; print(onpolicy.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True)
    assert str(ROOT) not in where.stdout and "site-packages" in where.stdout, where.stdout + where.stderr

    onpolicy = str(venv / "bin" / "onpolicy")
    r = subprocess.run([onpolicy, "recipes"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert (r.returncode == 0 and "tiny/stage1_mask" in r.stdout
            and "deepspeed/zero0.json" in r.stdout), r.stderr
    r = subprocess.run([onpolicy, "recipes", "cp", "tiny/stage1_mask", "."], cwd=elsewhere, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and (elsewhere / "stage1_mask.yaml").is_file(), r.stderr
    r = subprocess.run([onpolicy, "train", "recipes/tiny/stage1_mask.yaml", "train.max_steps=2",
                        "train.micro_batch_size=2", "train.eval_batches=1", "data.seq_len=64",
                        "model.hidden_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2",
                        "model.block_size=8", "tokenizer.vocab_size=300", f"data.source={code_dir}",
                        "data.cache_dir=cache", "logging.output_dir=run", "logging.progress=false"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (elsewhere / "run" / "final" / "config.json").is_file()
    assert json.loads((elsewhere / "run" / "summary.json").read_text())["steps"] == 2
