import io
import json
import shutil
from dataclasses import replace

import pytest
import torch

from onpolicy.bench import Setting, plot, run_bench, settings
from onpolicy.sampling import SamplerConfig, generate
from onpolicy.tokenizer import SpecialTokens, train_tokenizer
from onpolicy.visualize import MASK_GLYPH, frames, show, trajectory_html
from verifiers import Task


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def add(a, b):\n    return a + b\n" * 20, "x = [i for i in range(10)]\n" * 20],
                           vocab_size=300)


def models_for(tok):
    from onpolicy.model import DiffusionTransformer, DiffusionTransformerConfig

    special = SpecialTokens.from_tokenizer(tok)
    out = {}
    for name, attention in (("diffusion", "block_causal"), ("ar", "causal")):
        torch.manual_seed(0)
        out[name] = DiffusionTransformer(DiffusionTransformerConfig(
            vocab_size=special.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            attention=attention, block_size=4, mask_token_id=special.mask)).eval()
    return out, special


def test_frames_and_html_replay(tokenizer):
    models, special = models_for(tokenizer)
    prompt = tokenizer("def add(a, b):", add_special_tokens=False)["input_ids"]
    traj = generate(models["diffusion"], [prompt], special,
                    SamplerConfig(max_new_tokens=8, steps_per_block=2, stop_at_eos=False))
    steps = frames(traj.row(0), tokenizer, special.mask, special.eos)
    assert len(steps) == 4
    assert [sum(k == "mask" for _, k in s) for s in steps] == [6, 4, 2, 0]
    assert [sum(k == "new" for _, k in s) for s in steps] == [2, 2, 2, 2]
    page = trajectory_html("def add(a, b):", steps)
    assert page.count("<script>") == 1 and "http" not in page.replace("http-equiv", "")  # self-contained
    assert json.dumps([[t, k] for t, k in steps[0]]) in page
    buf = io.StringIO()
    show("p", steps, delay=0, stream=buf)
    assert buf.getvalue().count("step ") == 4 and MASK_GLYPH in buf.getvalue()


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_bench_reports_every_setting(tokenizer, tmp_path):
    from verifiers import PythonTestVerifier

    models, _ = models_for(tokenizer)
    tasks = [Task(f"t/{i}", "def add(a, b):\n", "add",
                  "def check(candidate):\n    assert candidate(1, 2) == 3\n") for i in range(2)]
    grid = settings([4, 8], [0.5], max_new_tokens=8, with_ar=True)
    assert [s.name for s in grid] == ["ar", "diffusion B=4 1 tok/step", "diffusion B=4 p>=0.5",
                                      "diffusion B=8 1 tok/step", "diffusion B=8 p>=0.5"]
    grid += settings([4], [], max_new_tokens=8, with_ar=False, model="before")  # `bench --before`
    # `bench --lock-step`
    grid += [Setting(f"{s.name} lock-step", s.model, replace(s.sampler, per_row=False)) for s in grid[:3]]
    models["before"] = models["diffusion"]
    with PythonTestVerifier(workers=1) as v:
        results = run_bench(models, tokenizer, tasks, grid, v)
    assert results["ar"]["speed_vs_ar"] == 1.0 and results["ar"]["block_size"] == 1
    assert results["ar lock-step"]["speed_vs_ar"] == 1.0 and results["ar lock-step"]["lock_step"]
    for name in ("ar", "diffusion B=4 1 tok/step", "diffusion B=4 p>=0.5"):  # the same tokens either way
        assert (results[f"{name} lock-step"]["tokens"] == results[name]["tokens"]
                and not results[name]["lock_step"])
    assert (results["before B=4 1 tok/step"]["block_size"] == 4
            and results["diffusion B=8 p>=0.5"]["block_size"] == 8)
    for r in results.values():
        assert r["tokens_per_s"] > 0 and 0 <= r["sampler_overhead"] < 1 and r["pass_at_1"] == 0.0
        assert r["tokens_per_forward"] == pytest.approx(1 / r["forwards_per_token"])
    # one token per step never beats one token per forward
    assert results["diffusion B=8 1 tok/step"]["tokens_per_forward"] <= 1.0
    plot(results, tmp_path / "f.png", "test")
    assert (tmp_path / "f.png").stat().st_size > 1000


def memorizing_models(tok, text: str, steps: int = 150):
    """A causal and a block-causal model that have learned `text` by heart (seconds on CPU), so the
    sandbox has something that passes."""
    from onpolicy.diffusion.corruption import mask_tokens
    from onpolicy.diffusion.losses import causal_lm_loss, masked_diffusion_loss

    models, special = models_for(tok)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"] + [special.eos] * 8])
    ids = ids[:, : ids.shape[1] // 4 * 4]
    for name, model in models.items():
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            if name == "ar":
                loss, _ = causal_lm_loss(model(input_ids=ids).logits, ids)
            else:
                rate = torch.rand(4, generator=g)
                x_t, masked = mask_tokens(ids.expand(4, -1), rate, special.mask, generator=g)
                loss, _ = masked_diffusion_loss(model(input_ids=x_t,
                                                      clean_input_ids=ids.expand(4, -1)).logits,
                                                ids.expand(4, -1), masked, 1 / rate)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    return models, special


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_eval_and_bench_agree_and_bench_shows_a_pass(tokenizer):
    """The same model, tasks and settings give the same pass@1 and forwards per token in `eval`
    (batched) and `bench` (batch 1): one rollout path, one definition of forwards per token."""
    from onpolicy.evaluation import evaluate_checkpoint
    from verifiers import PythonTestVerifier

    models, _ = memorizing_models(tokenizer, "def add(a, b):\n    return a + b\n")
    tasks = [Task(f"t/{i}", "def add(a, b):\n", "add",
                  "def check(candidate):\n    assert candidate(1, 2) == 3\n") for i in range(2)]
    tasks.append(Task("t/wrong", "def add(a, b):\n", "add",
                      "def check(candidate):\n    assert candidate(1, 2) == 4\n"))
    grid = settings([4], [0.5], max_new_tokens=12, with_ar=True)
    with PythonTestVerifier(workers=1) as v:
        bench = run_bench(models, tokenizer, tasks, grid, v)
        # the memorised body passes; the wrong test fails
        assert bench["ar"]["pass_at_1"] == pytest.approx(2 / 3)
        for s in grid:
            ev = evaluate_checkpoint(models[s.model], tokenizer, tasks, s.sampler, samples=1, verifier=v,
                                     batch_size=3)
            assert ev["pass@1"] == pytest.approx(bench[s.name]["pass_at_1"]), s.name
            assert ev["forwards_per_token"] == pytest.approx(bench[s.name]["forwards_per_token"]), s.name


def test_bench_takes_generated_task_sets_and_outside_models(tmp_path):
    """`onpolicy bench --tasks generated:validation` and a transformers Llama as the AR side."""
    from onpolicy.bench import main
    from onpolicy.loading import load_model

    from .test_hf_causal import make_llama_folder

    folder = make_llama_folder(tmp_path / "llama")
    model, tok = load_model(folder)
    assert model.config.attention == "causal"
    args = type("Args", (), dict(checkpoint=str(folder), ar=str(folder), before=None,
                                 tasks="generated:validation", limit=2, seed=0, block_sizes=[4],
                                 thresholds=[], steps=[], max_new_tokens=6, device="cpu", threads=1,
                                 out=str(tmp_path / "b.json"), png=None))
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap not installed")
    assert main(args) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["n_tasks"] == 2 and report["tasks"] == "generated:validation"
    assert report["results"]["ar"]["tokens"] > 0
