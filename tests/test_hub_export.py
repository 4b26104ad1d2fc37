"""Exports ready for the Hub: no path of this machine in any file, the card states the real shape (adapters
counted apart), its usage snippet runs as written, and `onpolicy push` uploads through huggingface_hub."""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import ROOT, run_cli
from .test_export import _NO_ONPOLICY


def machine_marks(*folders: Path) -> set[str]:
    return {str(Path.home()) + "/", str(ROOT) + "/", tempfile.gettempdir() + "/",
            *(str(f.resolve()) for f in folders)}


def files_naming(folder: Path, marks: set[str]) -> list[str]:
    hits = []
    for f in folder.rglob("*"):
        if f.is_file() and f.name not in ("tokenizer.json", "vocab.json") and f.suffix != ".safetensors":
            text = f.read_text(errors="ignore")
            hits += [f"{f.relative_to(folder)}: {m}" for m in marks if m in text]
    return hits


def test_the_cards_usage_snippet_runs_as_written_without_onpolicy(tmp_path, init_model):
    out = tmp_path / "export"
    r = run_cli("export", str(init_model), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    card = (out / "README.md").read_text()
    # nothing invites transformers' pipeline(), which cannot drive the sampler
    assert "pipeline_tag" not in card
    assert "2 layers, hidden size 32" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("path/to/this/folder", str(out))
    done = subprocess.run([sys.executable, "-c", _NO_ONPOLICY + snippet], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("def add(a, b):")


@pytest.mark.slow
def test_an_exported_lora_run_from_init_from_names_no_machine_path_and_its_real_shape(tmp_path, init_model):
    code = tmp_path / "my code" / "src"
    code.mkdir(parents=True)
    for i in range(6):
        handler = f"def handler_{i}(request):\n    return request.get('v{i}', {i})\n"
        (code / f"m{i}.py").write_text(handler * 20)
    run = tmp_path / "run"
    r = run_cli("train", "recipes/tiny/lora_domain.yaml", f"model.init_from={init_model}",
                f"data.source={code}", "data.seq_len=32", "data.val_fraction=0.3", "train.max_steps=2",
                "train.micro_batch_size=2", "train.eval_every=0", f"data.cache_dir={tmp_path / 'cache'}",
                f"logging.output_dir={run}", "logging.progress=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainable params" in r.stdout  # as PEFT reports it
    config = (run / "config.yaml").read_text()
    # the model's shape, not the recipe's default
    assert "hidden_size: 32" in config and "num_hidden_layers: 2" in config
    out = tmp_path / "export"
    r = run_cli("export", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    marks = machine_marks(init_model, code, run)
    assert files_naming(out, marks) == [] and files_naming(run / "final-adapter", marks) == []
    card = (out / "README.md").read_text()
    assert "2 layers, hidden size 32" in card and "LoRA adapters" in card
    assert "source: src" in card  # the recipe in the card names the data folder, not its path
    base = json.loads((run / "final-adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert not Path(base).is_absolute()
    r = run_cli("sample", str(run / "final-adapter"), "--prompt", "def handler_", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr[-2000:]  # the relative base still loads


def test_push_uploads_through_huggingface_hub_and_refuses_machine_paths(tmp_path, init_model):
    from onpolicy.errors import ConfigError
    from onpolicy.export import push_folder

    class StandIn:  # huggingface_hub.HfApi's two calls, recorded (tests run offline)
        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, **kw):
            self.calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            self.calls.append(("upload_folder", kw["repo_id"],
                               sorted(p.name for p in Path(kw["folder_path"]).iterdir())))

    out = tmp_path / "export"
    assert run_cli("export", str(init_model), "--out", str(out)).returncode == 0
    api = StandIn()
    assert push_folder(out, "me/tiny-coder", private=True, api=api) == "https://huggingface.co/me/tiny-coder"
    assert api.calls[0] == ("create_repo", "me/tiny-coder",
                            {"private": True, "exist_ok": True, "repo_type": "model"})
    assert (api.calls[1][0] == "upload_folder" and "config.json" in api.calls[1][2]
            and "README.md" in api.calls[1][2])
    (out / "README.md").write_text((out / "README.md").read_text() + f"\nfrom {tmp_path}/somewhere\n")
    with pytest.raises(ConfigError, match="README.md"):
        push_folder(out, "me/tiny-coder", api=StandIn())
    with pytest.raises(ConfigError, match="not a model folder"):
        push_folder(tmp_path, "me/x", api=StandIn())
