"""LoRA on a user's code, and the tokenizer that follows the model."""

import hashlib
import json
import random

import pytest
import torch

from .conftest import run_cli


def _domain_code(folder, n_files=24, seed=0):
    """Python files full of identifiers no other corpus has (what a domain adapter must learn)."""
    rng = random.Random(seed)
    words = ["zorblax", "quindle", "fromage", "vexilla", "throck", "mibber", "plonkus", "gristle"]
    folder.mkdir()
    for i in range(n_files):
        funcs = []
        for _ in range(6):
            a, b = rng.sample(words, 2)
            funcs.append(f"def {a}_{b}_{rng.randint(0, 9)}({b}_count, {a}_list):\n    {a}_total = {b}_count "
                         f"* len({a}_list)\n"
                         f"    return {a}_total + {rng.randint(1, 99)}\n")
        (folder / f"domain_{i}.py").write_text("\n\n".join(funcs))
    return folder


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file()}


def _fingerprint(folder):
    from onpolicy.tokenizer import load_tokenizer, tokenizer_fingerprint

    return tokenizer_fingerprint(load_tokenizer(folder))


@pytest.mark.slow
def test_lora_adapter_learns_a_domain_and_leaves_the_base_untouched(tmp_path, init_model):
    from onpolicy.loading import load_pretrained

    code = _domain_code(tmp_path / "code")
    before = _digest(init_model)
    out = tmp_path / "run"
    r = run_cli("train", "recipes/tiny/lora_domain.yaml", f"model.init_from={init_model}",
                f"data.source={code}", "data.seq_len=64", "data.val_fraction=0.25", "train.max_steps=80",
                "train.micro_batch_size=8", "train.eval_every=0", "train.lr=1e-2", "lora.r=8",
                "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]",
                f"data.cache_dir={tmp_path / 'cache'}", f"logging.output_dir={out}", "logging.progress=false")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # measurably lower on the domain's held-out files
    assert summary["val_loss_end"] < summary["val_loss_start"] - 0.3, summary
    assert _digest(init_model) == before  # the base folder is untouched ...
    adapter = out / "final-adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    # ... and its tokenizer kept (not retrained on the code)
    assert _fingerprint(out / "final") == _fingerprint(init_model)

    base, _ = load_pretrained(init_model)
    peft_model, tok = load_pretrained(adapter, merge_adapter=False)
    inner = peft_model.get_base_model()
    # ... and, inside the adapter model, the base weights are bit-identical
    for name, p in base.state_dict().items():
        wrapped = name.replace(".weight", ".base_layer.weight")
        key = wrapped if wrapped in inner.state_dict() else name
        assert torch.equal(inner.state_dict()[key], p), name
    x = torch.tensor([tok("def zorblax_quindle_3(", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        unmerged = peft_model(input_ids=x).logits
        merged, _ = load_pretrained(adapter)
        exported, _ = load_pretrained(out / "final")
        torch.testing.assert_close(merged(input_ids=x).logits, unmerged, rtol=0, atol=1e-5)
        torch.testing.assert_close(exported(input_ids=x).logits, unmerged, rtol=0, atol=1e-5)
        assert (base(input_ids=x).logits - unmerged).abs().max() > 1e-3  # the adapter does something
    r = run_cli("merge", str(adapter), "--out", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr[-2000:]
    again, _ = load_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, unmerged, rtol=0, atol=1e-5)
    r = run_cli("sample", str(adapter), "--prompt", "def zorblax_", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_tokenizer_follows_the_model_and_a_foreign_one_is_refused(tmp_path, init_model, code_dir):
    from onpolicy.config import load_config
    from onpolicy.data.corpus import stdlib_root
    from onpolicy.errors import ConfigError
    from onpolicy.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer
    from onpolicy.trainers.common import prepare_data

    over = [f"model.init_from={init_model}", f"data.source={code_dir}",
            f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=64"]
    cfg = load_config("recipes/tiny/lora_domain.yaml", over)
    # other data: the model's tokenizer all the same
    tokenizer, corpus, special = prepare_data(cfg, builder=True)
    own = load_tokenizer(init_model)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(own) and special.vocab_size == len(own)
    assert corpus.train.shape[0] > 0

    foreign = train_tokenizer([(stdlib_root() / n).read_text()
                               for n in ("textwrap.py", "calendar.py", "string.py")],
                              vocab_size=len(own))
    assert len(foreign) == len(own)  # the same size: only the content tells them apart
    foreign.save_pretrained(tmp_path / "foreign")
    cfg = load_config("recipes/tiny/lora_domain.yaml", [*over, f"tokenizer.path={tmp_path / 'foreign'}"])
    with pytest.raises(ConfigError,
                       match=r"tokenizer.path=.*foreign.* is not the tokenizer of model.init_from"):
        prepare_data(cfg, builder=True)
    cfg = load_config("recipes/tiny/lora_domain.yaml", [*over, f"tokenizer.path={init_model}"])
    # its own: accepted
    assert tokenizer_fingerprint(prepare_data(cfg, builder=True)[0]) == tokenizer_fingerprint(own)


def test_a_recipe_names_the_values_it_leaves_to_the_user():
    from onpolicy.config import load_config
    from onpolicy.errors import ConfigError

    with pytest.raises(ConfigError, match="set model.init_from, data.source"):
        load_config("recipes/tiny/lora_domain.yaml")
