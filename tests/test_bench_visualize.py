import io
import json
import shutil

import pytest
import torch

from onpolicy.bench import plot, run_bench, settings
from onpolicy.sampling import SamplerConfig, generate
from onpolicy.tokenizer import SpecialTokens, train_tokenizer
from onpolicy.visualize import MASK_GLYPH, frames, show, trajectory_html
from verifiers import Task


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def add(a, b):\n    return a + b\n" * 20, "x = [i for i in range(10)]\n" * 20], vocab_size=300)


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
    traj = generate(models["diffusion"], [prompt], special, SamplerConfig(max_new_tokens=8, steps_per_block=2, stop_at_eos=False),
                    record_states=True)
    steps = frames(traj.states, 0, tokenizer, special.mask, special.eos)
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
    tasks = [Task(f"t/{i}", "def add(a, b):\n", "add", "def check(candidate):\n    assert candidate(1, 2) == 3\n") for i in range(2)]
    grid = settings([4, 8], [0.5], max_new_tokens=8, with_ar=True)
    assert [s.name for s in grid] == ["ar", "diffusion B=4 1 tok/step", "diffusion B=4 p>=0.5",
                                      "diffusion B=8 1 tok/step", "diffusion B=8 p>=0.5"]
    with PythonTestVerifier(workers=1) as v:
        results = run_bench(models, tokenizer, tasks, grid, v)
    assert results["ar"]["speed_vs_ar"] == 1.0 and results["ar"]["block_size"] == 1
    for r in results.values():
        assert r["tokens_per_s"] > 0 and 0 <= r["sampler_overhead"] < 1 and r["pass_at_1"] == 0.0
        assert r["tokens_per_forward"] == pytest.approx(1 / r["forwards_per_token"])
    # one token per step never beats one token per forward
    assert results["diffusion B=8 1 tok/step"]["tokens_per_forward"] <= 1.0
    plot(results, tmp_path / "f.png", "test")
    assert (tmp_path / "f.png").stat().st_size > 1000
