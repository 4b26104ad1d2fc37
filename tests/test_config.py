from pathlib import Path

import pytest

from onpolicy.config import STAGES, ConfigError, load_config

from .conftest import ROOT, run_cli

ALL_YAML = sorted((ROOT / "recipes").rglob("*.yaml"))
PIPELINES = [p for p in ALL_YAML if p.name.startswith("pipeline")]
RECIPES = [p for p in ALL_YAML if p not in PIPELINES]


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_pipeline_file_loads_and_its_stages_are_recipes(pipeline, monkeypatch):
    from onpolicy.pipeline import load_pipeline

    monkeypatch.chdir(ROOT)
    spec = load_pipeline(pipeline.relative_to(ROOT))
    assert pipeline.read_text().splitlines()[0].startswith("# onpolicy pipeline "), ("pipeline files start "
                                                                                     "with their command")
    for stage in spec.stages:  # each stage's recipe with its overrides is a valid config
        load_config(ROOT / stage.recipe, [*spec.overrides, *stage.overrides])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_loads_into_its_schema(recipe):
    text = recipe.read_text()
    # values a recipe leaves to the user (`???`) are filled as its command line says
    required = {"model.init_from": "model.init_from=runs/x/final", "data.source": "data.source=my_code/"}
    cfg = load_config(recipe, [v for k, v in required.items() if f"{k.split('.')[1]}: ???" in text])
    assert isinstance(cfg, STAGES[cfg.stage][0])
    first = recipe.read_text().splitlines()[0]
    assert (first.startswith("# onpolicy train ")
            or first.startswith("# deepspeed ")), "recipes start with their command"
    assert (ROOT / cfg.train.deepspeed).is_file()


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"stage1_mask.yaml", "ar_baseline.yaml"} <= names


def test_overrides_apply_and_type_check():
    cfg = load_config(ROOT / "recipes/tiny/stage1_mask.yaml", ["train.max_steps=7", "model.block_size=16"])
    assert cfg.train.max_steps == 7 and cfg.model.block_size == 16
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(None, stage="pretrain", overrides=["train.max_steps=ten"])


def test_unknown_key_names_key_and_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, stage="pretrain", overrides=["train.max_step=3"])
    msg = str(e.value)
    assert "train.max_step" in msg and "did you mean 'max_steps'" in msg and "micro_batch_size" in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: pretrain\nmodel:\n  hidden: 3\n")
    with pytest.raises(ConfigError, match=r"'model\.hidden'.*hidden_size"):
        load_config(bad)
    with pytest.raises(ConfigError, match="valid keys under '<top>'"):
        load_config(None, stage="pretrain", overrides=["trian.lr=1"])


def test_impossible_combinations_fail_clearly():
    with pytest.raises(ConfigError,
                       match="diffusion.objective' was removed: the objective follows model.attention"):
        load_config(None, stage="pretrain", overrides=["diffusion.objective=causal"])
    with pytest.raises(ConfigError, match="multiple of model.block_size"):
        load_config(None, stage="pretrain", overrides=["data.seq_len=100", "model.block_size=32"])
    with pytest.raises(ConfigError, match="model.attention='sideways'"):
        load_config(None, stage="pretrain", overrides=["model.attention=sideways"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, stage="pretrain",
                    overrides=["model.hidden_size=100", "model.num_attention_heads=3"])
    with pytest.raises(ConfigError,
                       match="loss.anchor feeds the jump term: set loss.surrogate to jump or both"):
        load_config("recipes/tiny/stage4_onpolicy.yaml",
                    overrides=["loss.anchor=1", "loss.surrogate=progress"])
    with pytest.raises(ConfigError, match="loss.anchor and loss.anchor_rows must be >= 0"):
        load_config("recipes/tiny/stage4_onpolicy.yaml", overrides=["loss.anchor=-1"])


def test_missing_config_file_names_path():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(Path("nope.yaml"))


def test_cli_reports_bad_key_and_missing_corpus_without_traceback(tmp_path):
    r = run_cli("train", "recipes/tiny/stage1_mask.yaml", "train.lr_max=1")
    assert r.returncode == 2
    assert "unknown config key 'train.lr_max'" in r.stderr and "Traceback" not in r.stderr
    missing = tmp_path / "no_such_corpus"
    r = run_cli("train", "recipes/tiny/stage1_mask.yaml", f"data.source={missing}",
                f"logging.output_dir={tmp_path}/run")
    assert r.returncode == 2
    assert str(missing) in r.stderr and "Traceback" not in r.stderr


def test_a_recipe_must_name_its_stage(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text("train:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="did you forget `stage: ...`"):
        load_config(bare)
    with pytest.raises(ConfigError, match="unknown stage 'mask'; valid stages: pretrain"):
        load_config(None, ["stage=mask"])


def test_sections_from_other_modules_keep_the_unknown_key_check():
    from dataclasses import dataclass, field

    from onpolicy.config import PretrainConfig, register_stage
    from onpolicy.sampling import SamplerConfig

    @dataclass
    class WithSampler(PretrainConfig):
        sampler: SamplerConfig = field(default_factory=SamplerConfig)

    register_stage("test-sampler", WithSampler, "onpolicy.trainers.pretrain:train")
    try:
        cfg = load_config(None, ["stage=test-sampler", "sampler.threshold=0.9"])
        assert isinstance(cfg.sampler, SamplerConfig) and cfg.sampler.threshold == 0.9
        with pytest.raises(ConfigError, match=r"'sampler\.treshold' \(did you mean 'threshold'\?\)"):
            load_config(None, ["stage=test-sampler", "sampler.treshold=0.9"])
    finally:
        STAGES.pop("test-sampler")


def test_impossible_sampler_settings_and_malformed_files_get_one_line(tmp_path):
    from onpolicy.sampling import SamplerConfig

    with pytest.raises(ConfigError, match="block_size=0 must be >= 1"):
        SamplerConfig(block_size=0)
    with pytest.raises(ConfigError, match="threshold=-0.5 must be >= 0"):
        SamplerConfig(threshold=-0.5)
    with pytest.raises(ConfigError, match="top_p=0 must be in"):
        SamplerConfig(top_p=0)
    tasks = tmp_path / "tasks.jsonl"
    task = '{"task_id": "a", "prompt": "def f():\\n", "entry_point": "f", "test": "def check(c): pass"}\n'
    tasks.write_text(task + '{oops\n')
    r = run_cli("verify", str(tasks), str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and f"{tasks}:2: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    tasks.write_text(task)
    completions = tmp_path / "c.jsonl"
    completions.write_text('{"task_id": "a", "completion": "    return 1"}\n{"task_id": "a"}\n')
    r = run_cli("verify", str(tasks), str(completions), "--out", str(tmp_path / "o.jsonl"))
    assert (r.returncode == 2 and f"{completions}:2: a completion line needs" in r.stderr
            and "Traceback" not in r.stderr)
    r = run_cli("sample", "nowhere", "--prompt", "x", "--block-size", "0")
    assert r.returncode == 2 and "block_size=0 must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_a_recipe_can_start_from_another_with_base(tmp_path):
    """`base:` takes the other recipe's keys and lays this one's over them, mapping by mapping; a bad key in
    either is still named; a missing base and a loop are clear errors."""
    (tmp_path / "parent.yaml").write_text("stage: pretrain\ntrain:\n  max_steps: 7\n  lr: 0.5\n  betas: "
                                          "[0.8, 0.9]\n"
                                          "logging:\n  output_dir: runs/parent\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain:\n  lr: 0.25\n  betas: [0.7, 0.75]\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.max_steps=9"])
    assert (cfg.train.max_steps, cfg.train.lr, list(cfg.train.betas)) == (9, 0.25, [0.7, 0.75])
    assert cfg.logging.output_dir == "runs/parent"  # untouched sections come whole from the base
    # a shipped recipe as the base, by the path `onpolicy train` takes
    (tmp_path / "shipped.yaml").write_text("base: recipes/tiny/stage1_mask.yaml\ntrain:\n  max_steps: 3\n")
    shipped = load_config(tmp_path / "shipped.yaml")
    assert (shipped.train.max_steps == 3
            and shipped.model == load_config("recipes/tiny/stage1_mask.yaml").model)
    (tmp_path / "typo.yaml").write_text("base: parent.yaml\ntrain:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.max_step'"):
        load_config(tmp_path / "typo.yaml")
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\nstage: pretrain\n")
    with pytest.raises(ConfigError, match="orphan.yaml: base: nowhere.yaml: no such recipe"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\nstage: pretrain\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="comes back to it"):
        load_config(tmp_path / "a.yaml")
