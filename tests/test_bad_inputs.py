"""Bad input gets one line naming the key, file or option (and what would be valid), and no traceback,
before anything heavy runs: a table of cases across every command, run through the real CLI entry point."""

import json

import pytest

from onpolicy.cli import main

from .conftest import run_cli

S4 = "recipes/tiny/stage4_onpolicy.yaml"
S1 = "recipes/tiny/stage1_mask.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory, init_model):
    d = tmp_path_factory.mktemp("bad")
    (d / "broken.yaml").write_text("stage: pretrain\ntrain:\n  max_steps: [1, 2\n")
    (d / "broken.jsonl").write_text('{"task_id": "a", "prompt": "x"\n')
    (d / "samples.jsonl").write_text('{"task_id": "generated/validation/L1/0", "completion": "x"}\n'
                                     'not json\n')
    (d / "pipe_unknown.yaml").write_text("stages: [{name: a, recipe: recipes/tiny/stage1_mask.yaml}]\nbogus: "
                                         "1\n")
    (d / "pipe_order.yaml").write_text("stages:\n  - "
                                       "{name: a, recipe: recipes/tiny/stage1_mask.yaml, init_from: b}\n"
                                       "  - {name: b, recipe: recipes/tiny/stage1_mask.yaml}\n")
    (d / "pipe_broken.yaml").write_text("stages: [\n")
    (d / "full").mkdir()
    (d / "full" / "x.txt").write_text("something")
    return {"dir": d, "model": str(init_model)}


def cases(f):
    d, m = f["dir"], f["model"]
    out = f"logging.output_dir={d}/run"
    return [
        # train: config keys and values
        (["train", S1, "model.block_size=0", out], "model.block_size"),
        (["train", S1, "data.seq_len=0", out], "data.seq_len"),
        (["train", S1, "train.lr=-1", out], "train.lr"),
        (["train", S1, "train.max_stepz=3", out], "train.max_stepz"),
        (["train", S1, "train.max_steps=ten", out], "max_steps"),
        (["train", S1, "model.attention=sideways", out], "model.attention"),
        (["train", S1, "lora.r=4", "lora.target_modules=[q_prj]", out], "q_prj"),
        (["train", S1, "train.precision=fp8", out], "train.precision"),
        (["train", str(d / "broken.yaml")], "broken.yaml:4:1: not valid YAML"),
        (["train", str(d / "missing.yaml")], "missing.yaml"),
        (["train", S4, out], "model.init_from"),
        (["train", S4, f"model.init_from={m}", "rollout.tasks=generated:nonsense", out], "rollout.tasks"),
        (["train", S4, f"model.init_from={m}", "rollout.tasks=no/such/tasks.jsonl", out], "rollout.tasks"),
        (["train", S4, f"model.init_from={m}", f"rollout.tasks={d}/broken.jsonl", out], "broken.jsonl:1"),
        (["train", S4, f"model.init_from={m}", "rollout.verifier=nope:Thing", out], "rollout.verifier"),
        (["train", S4, f"model.init_from={m}", "validation.tasks=generated:heldout:skip=-3", out],
         "validation.tasks"),
        (["train", S4, f"model.init_from={m}", "model.hidden_size=64", out], "model.hidden_size"),
        (["train", "recipes/tiny/stage3_order.yaml", f"model.init_from={m}", "pool.prefer=slow", out],
         "pool.prefer"),
        # pipeline
        (["pipeline", str(d / "no_such_pipeline.yaml")], "no_such_pipeline.yaml"),
        (["pipeline", str(d / "pipe_unknown.yaml")], "bogus"),
        (["pipeline", str(d / "pipe_order.yaml")], "'b'"),
        (["pipeline", str(d / "pipe_broken.yaml")], "pipe_broken.yaml"),
        # eval and bench
        (["eval", str(d / "no_model")], "no_model"),
        (["eval", m, "--tasks", "generated:nonsense"], "nonsense"),
        (["eval", m, "--block-size", "0", "--limit", "1"], "block"),
        (["bench", str(d / "no_model")], "no_model"),
        (["bench", m, "--tasks", str(d / "broken.jsonl")], "broken.jsonl:1"),
        # verify
        (["verify", "generated:validation", str(d / "missing.jsonl"), "--out", str(d / "r.jsonl")],
         "missing.jsonl"),
        (["verify", "generated:validation", str(d / "samples.jsonl"), "--out", str(d / "r.jsonl")],
         "samples.jsonl:2"),
        (["verify", "humaneval", str(d / "samples.jsonl"), "--out", str(d / "r.jsonl"), "--verifier", "nope"],
         "nope"),
        # export and merge
        (["export", str(d / "no_run")], "no_run"),
        (["export", m, "--llama", "--out", str(d / "llama_out")], "causal"),
        (["export", m, "--out", str(d / "full")], "full"),
        (["merge", m, "--out", str(d / "merged")], "adapter"),
        (["merge", m, "--out", str(d / "full")], "full"),
        # recipes
        (["recipes", "cp", "tiny/no_such_recipe", str(d)], "no_such_recipe"),
        (["recipes", "mv", "tiny/stage1_mask", str(d)], "mv"),
    ]


def test_every_bad_input_is_one_line_naming_it(files, capsys):
    table = cases(files)
    assert len(table) >= 25

    for argv, named in table:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert code not in (0, None), argv
        assert (len(lines) == 1
                and "Traceback" not in captured.err + captured.out), (argv, captured.err[-2000:])
        assert named in lines[0], (argv, lines[0])
    assert not (files["dir"] / "llama_out").exists()  # a refused Llama export leaves no empty folder
    assert (files["dir"] / "full" / "x.txt").read_text() == "something"  # nothing overwritten


def test_a_hidden_data_source_and_errors_inside_a_run_are_one_line(tmp_path):
    source = tmp_path / "site-packages" / "pkg"
    source.mkdir(parents=True)
    (source / "a.py").write_text("x = 1\n")
    r = run_cli("train", S1, f"data.source={source.parent}", f"logging.output_dir={tmp_path / 'run'}",
                f"data.cache_dir={tmp_path / 'cache'}")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "data.exclude" in lines[0], r.stderr[-2000:]
    assert "[rank0]" not in r.stderr + r.stdout and "Traceback" not in r.stderr


def test_recipes_cp_into_a_new_folder_writes_the_recipe_inside_it(tmp_path):
    target = tmp_path / "some" / "new" / "dir"
    assert main(["recipes", "cp", "tiny/stage1_mask", f"{target}/"]) == 0
    assert (target / "stage1_mask.yaml").is_file()


def test_print_config_shows_the_merged_validated_config(capsys):
    assert main(["train", "recipes/tiny/stage4_onpolicy_b8.yaml", "train.max_steps=7", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "max_steps: 7" in text and "anchor: 1.0" in text and "jump_gap_end: 8" in text
    json.dumps(text)  # plain text, printed and done
