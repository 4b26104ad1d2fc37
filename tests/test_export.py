"""Exported folders load anywhere: with trust_remote_code in a Python where onpolicy cannot be
imported, and (AR) as a plain LlamaForCausalLM whose greedy `generate` equals our sampler."""

import json
import os
import subprocess
import sys

import pytest
import torch

# A subprocess in which `import onpolicy` / `import verifiers` fail, however they are installed.
_NO_ONPOLICY = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("onpolicy", "verifiers"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
try:
    import onpolicy  # noqa
    raise SystemExit("onpolicy was importable")
except ImportError:
    pass
"""


def _tokenizer_and_special():
    from onpolicy.data.generated import generate_tasks
    from onpolicy.tokenizer import SpecialTokens, train_tokenizer

    tasks = generate_tasks("train", 100)
    tok = train_tokenizer([t.prompt + t.canonical_solution for t in tasks], vocab_size=300)
    return tok, SpecialTokens.from_tokenizer(tok)


def _model(special, attention, **kw):
    from onpolicy.model import DiffusionTransformer, DiffusionTransformerConfig

    torch.manual_seed(0)
    cfg = DiffusionTransformerConfig(vocab_size=special.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, attention=attention, mask_token_id=special.mask,
                                     pad_token_id=special.pad, bos_token_id=special.bos,
                                     eos_token_id=special.eos, **kw)
    return DiffusionTransformer(cfg).eval()


def test_exported_diffusion_model_loads_without_onpolicy(tmp_path):
    from onpolicy.export import save_model_folder
    from onpolicy.sampling import SamplerConfig, generate

    tok, special = _tokenizer_and_special()
    model = _model(special, "block_causal", block_size=4, shift_logits=True, num_key_value_heads=2)
    model.config.decoding = {"block_size": 32}  # inherited from a parent model trained at block 32
    folder = save_model_folder(model, tok, tmp_path / "export",
                               decoding={"threshold": 0.9, "max_new_tokens": 12},
                               card={"base_model": "my/base", "stage": "onpolicy",
                                     "recipe": "stage: onpolicy\n", "eval": {"pass@1": 0.25}})
    x = torch.randint(10, special.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    prompt = tok("def add(a, b):\n", add_special_tokens=False)["input_ids"]
    ours = generate(model, [prompt], special, SamplerConfig(max_new_tokens=12, threshold=0.9)).tokens[0]
    torch.save({"x": x, "logits": model(input_ids=x).logits, "prompt": prompt}, tmp_path / "ref.pt")

    script = _NO_ONPOLICY + f"""
import torch
from transformers import AutoModel, AutoTokenizer
folder = {str(folder)!r}
ref = torch.load({str(tmp_path / "ref.pt")!r})
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(folder)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
torch.testing.assert_close(model(input_ids=ref["x"]).logits, ref["logits"], rtol=0, atol=1e-5)
assert tok("def add(a, b):\\n", add_special_tokens=False)["input_ids"] == ref["prompt"]
out = model.diffusion_generate(torch.tensor([ref["prompt"]]))  # decoding defaults from config.json
print("TOKENS", out[0, len(ref["prompt"]):].tolist())
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    generated = json.loads(r.stdout.split("TOKENS", 1)[1])
    pad = special.pad
    assert [t for t in generated if t != pad] == ours  # the shipped sampler decodes as ours does

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_onpolicy.DiffusionTransformer"
    assert config["decoding"]["threshold"] == 0.9 and config["decoding"]["block_size"] == 4
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "base_model: my/base" in card
    assert "trust_remote_code=True" in card and "| pass@1 | 0.25 |" in card and "stage: onpolicy" in card


def test_ar_export_is_a_llama_whose_greedy_generate_equals_our_sampler(tmp_path):
    from transformers import LlamaForCausalLM

    from onpolicy.convert import to_llama
    from onpolicy.sampling import SamplerConfig, generate

    tok, special = _tokenizer_and_special()
    model = _model(special, "causal", block_size=1)
    to_llama(model).save_pretrained(tmp_path / "llama")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert type(llama) is LlamaForCausalLM
    prompts = [tok(p, add_special_tokens=False)["input_ids"]
               for p in ("def add(a, b):\n", "def f(x):\n    return")]
    n = 16
    ours = generate(model, prompts, special, SamplerConfig(max_new_tokens=n, stop_at_eos=False))
    for prompt, tokens in zip(prompts, ours.tokens):
        out = llama.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             suppress_tokens=[special.pad, special.mask], pad_token_id=special.pad,
                             eos_token_id=None)
        theirs = out[0, len(prompt):].tolist()
        cut = theirs.index(special.eos) if special.eos in theirs else n  # our tokens stop before EOS
        assert theirs[:cut] == tokens


def test_onpolicy_export_cli_writes_a_self_contained_folder(tmp_path, init_model):
    from onpolicy.cli import main

    assert main(["export", str(init_model), "--out", str(tmp_path / "out")]) == 0
    assert ((tmp_path / "out" / "modeling_onpolicy.py").is_file()
            and (tmp_path / "out" / "sampling.py").is_file())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]
    # not a causal model
    assert main(["export", str(init_model), "--llama", "--out", str(tmp_path / "llama")]) == 2
    with pytest.raises(SystemExit):
        main(["export"])


@pytest.mark.slow
def test_hub_model_ids_are_accepted_where_a_folder_is(tmp_path, init_model):
    """A Hub id resolves through the Hub cache (offline here: HF_HUB_OFFLINE=1 reads only the cache)."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-coder"
    shutil.copytree(init_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    script = """
import sys
from onpolicy.cli import main
assert main(["sample", "acme/tiny-coder", "--prompt", "def add(a, b):\\n", "--max-new-tokens", "8"]) == 0
print("---")
assert main(["sample", "acme/not-cached", "--prompt", "x"]) == 2
"""
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("def add(a, b):"), r.stderr[-2000:]
    assert "acme/not-cached" in r.stderr and "Traceback" not in r.stderr


def test_wandb_online_accepts_a_wandb_login(tmp_path, monkeypatch):
    from onpolicy.metrics import wandb_credentials

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_credentials()
    # what `wandb login` writes
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_credentials()
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_credentials()
