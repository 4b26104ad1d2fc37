"""One typed config schema per stage, and the STAGES registry. YAML files and `key=value` overrides
only fill a schema in.

    cfg = load_config("recipes/tiny/stage1_mask.yaml", ["train.max_steps=10"])
    train = stage_trainer(cfg.stage)      # the stage's train(cfg), imported only when run

Every recipe names its stage (`stage: pretrain`). An unknown key is an error naming the key and the
valid ones (sections defined in other modules, such as the sampler's, included); each stage schema
checks its own impossible combinations (`validate`). Nothing in a config is executed (no resolvers
that run code, no chdir).
"""

from __future__ import annotations

import difflib
import importlib
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from onpolicy.diffusion.policy import LOSS_TYPES, REWARD_FORMS, SCALE_REWARDS
from onpolicy.errors import ConfigError, yaml_problem
from onpolicy.sampling import SamplerConfig

ATTENTION_MODES = ("bidirectional", "block_causal", "causal")  # = onpolicy.model's (tests/test_config.py
# checks)
INHERIT = "inherit"  # model.attention: keep model.init_from's attention, block size and shift_logits
ATTENTION_KERNELS = ("auto", "sdpa", "flex")  # = onpolicy.model's
SCHEDULES = ("linear", "cosine")
T_SAMPLING = ("stratified", "antithetic", "iid")
EDIT_MODES = ("stack", "mix")
PRECISIONS = ("bf16", "fp32")
WANDB_MODES = ("disabled", "offline", "online")
SURROGATES = ("none", "progress", "jump", "both")  # stage 4's edit-distance surrogate(s)
JUMP_STATES = ("every", "sampled")  # stage 4: which replayed states of jump-only rows the jump term reads


@dataclass
class ModelConfig:
    """Shape of the DiffusionTransformer (ignored when `init_from` names a checkpoint)."""

    hidden_size: int = 256  # width of the residual stream
    num_hidden_layers: int = 6  # transformer blocks
    num_attention_heads: int = 4  # heads per attention layer
    intermediate_size: int | None = None  # SwiGLU width; None = 8/3 * hidden, rounded up to 64
    max_position_embeddings: int = 4096  # longest sequence RoPE is prepared for
    rope_theta: float = 10000.0  # RoPE base
    attention: str = "block_causal"  # bidirectional | block_causal | causal (the AR baseline: next-token
    # objective) | inherit: model.init_from's own (with its block_size and shift_logits)
    block_size: int = 32  # tokens per diffusion block (block_causal only)
    init_from: str | None = None  # start from: our folder or adapter, a Llama/Qwen2 folder or Hub id, a
    # .gguf, smollm2
    shift_logits: bool = False  # diffusion predicts position i from the hidden state at i - 1 (Dream's
    #                             AR-to-diffusion adaptation: keeps what an AR init learned); not for causal
    attention_kernel: str = "auto"  # auto | sdpa | flex: flex_attention block masks (no dense mask) on GPU


@dataclass
class TokenizerConfig:
    """Train a byte-level BPE on the training split, or use an existing HF tokenizer folder."""

    path: str | None = None  # local HF tokenizer folder; None = train one
    vocab_size: int = 2048  # BPE vocabulary size when training one
    train_max_mb: float = 32.0  # cap on the text used to train the BPE


@dataclass
class DataConfig:
    """Where the training text comes from and how it is packed."""

    source: str = "stdlib"  # "stdlib" | a folder | a glob | a .jsonl file
    text_field: str = "text"  # JSONL field holding the text
    extensions: list[str] = field(default_factory=lambda: [".py"])  # file types taken from a folder
    exclude: list[str] = field(default_factory=lambda: ["site-packages", "__pycache__"])  # path parts skipped
    max_files: int | None = None  # take at most this many files (after sorting and dedup)
    task_fraction: float = 0.0  # share of the text that is generated train tasks (prompt + solution), 0 =
    # none
    max_tasks: int = 20000  # cap on generated tasks added by task_fraction
    task_seed: int = 0  # seed of the task generator
    seq_len: int = 256  # packed sequence length in tokens
    val_fraction: float = 0.02  # share of files held out for validation (split by file)
    cache_dir: str = ".cache/onpolicy"  # tokenized corpora and trained tokenizers are cached here


@dataclass
class DiffusionConfig:
    """The masked-diffusion objective (docs/method.md, stage 1). Which objective trains follows
    `model.attention`: causal models learn next-token prediction, the others the mask ELBO."""

    schedule: str = "linear"  # gamma_t: linear | cosine
    t_eps: float = 1e-3  # t is drawn from [t_eps, 1] so the 1/t weight stays finite
    t_sampling: str = "stratified"  # stratified | antithetic | iid draws of t across a batch
    # Stage 2, edit diffusion (docs/method.md, stage 2): the last `edit_fraction` of the steps add edit
    # corruption (k_t = floor(L * alpha_t) substitutions / deletions / insertions, alpha_t =
    # edit_alpha_max * t) and the loss covers every position of an edited row. 0 = stage 1 only;
    # 1 = every step (continuing a stage-1 model). Causal models ignore it.
    edit_fraction: float = 0.2
    edit_alpha_max: float = 0.1  # alpha_t in [0, edit_alpha_max]
    edit_mode: str = "stack"  # stack: edits then masks on every row | mix: edit_share of the rows edit-only,
    # the rest mask-only
    edit_share: float = 0.5  # mix: share of rows edit-corrupted


@dataclass
class TrainConfig:
    """Optimisation, the DeepSpeed engine, evaluation and checkpoints."""

    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 16  # sequences per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50  # linear warm-up
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    precision: str = "bf16"  # bf16 (DeepSpeed bf16: bf16 weights, fp32 master weights; autocast) | fp32
    gradient_checkpointing: bool = False  # recompute layer activations in backward: less memory, ~1/3 more
    # compute
    deepspeed: str = "recipes/deepspeed/zero0.json"  # ZeRO config file
    seed: int = 0  # seeds init, data order and noise
    threads: int | None = None  # torch CPU threads per rank; None = cores / ranks
    eval_every: int = 100  # steps between validation passes (0 = only at the end)
    eval_batches: int = 8  # validation micro-batches per pass
    save_every: int = 0  # steps between resumable checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # resumable checkpoints kept on disk
    resume: bool | str = True  # true: the latest checkpoint in output_dir, if any; false: start over; or a
    # checkpoint folder
    stop_at_step: int | None = None  # end this invocation here (with a checkpoint); rerun to continue


@dataclass
class LoggingConfig:
    """Where the run writes and how it reports."""

    output_dir: str = "runs/stage1"  # checkpoints, metrics.jsonl, the exported model
    log_every: int = 10  # steps between metrics lines
    progress: bool = True  # a tqdm bar on rank 0
    wandb: str = "disabled"  # disabled | offline | online (online needs WANDB_API_KEY)
    wandb_project: str = "onpolicy"  # wandb project name
    run_name: str | None = None  # wandb run name; None = the output folder's name


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT) on the model, for any stage; r = 0 trains all weights."""

    r: int = 0  # adapter rank; 0 = off
    alpha: float = 16.0  # scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] | None = None  # module names to adapt; None = every linear layer but the head


@dataclass
class PretrainConfig:
    """Pre-training: stage 1 mask diffusion (bidirectional or block_causal) or the same-size AR baseline
    (model.attention=causal), one trainer."""

    stage: str = "pretrain"  # which trainer reads this config (see STAGES)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        """Reject combinations that cannot train, with the reason."""
        check_common(self)
        m, d, diff = self.model, self.data, self.diffusion
        _one_of(diff.schedule, SCHEDULES, "diffusion.schedule")
        _one_of(diff.t_sampling, T_SAMPLING, "diffusion.t_sampling")
        _one_of(diff.edit_mode, EDIT_MODES, "diffusion.edit_mode")
        for key in ("edit_fraction", "edit_alpha_max", "edit_share"):
            if not 0.0 <= getattr(diff, key) <= 1.0:
                raise ConfigError(f"diffusion.{key}={getattr(diff, key)} must be in [0, 1]")
        if m.attention == "block_causal" and d.seq_len % m.block_size:
            raise ConfigError(f"data.seq_len={d.seq_len} must be a multiple of "
                              f"model.block_size={m.block_size}")
        if d.seq_len > m.max_position_embeddings:
            raise ConfigError(f"data.seq_len={d.seq_len} exceeds "
                              f"model.max_position_embeddings={m.max_position_embeddings}")
        if not 0.0 <= d.task_fraction < 1.0:
            raise ConfigError(f"data.task_fraction={d.task_fraction} must be in [0, 1)")
        if not 0.0 < d.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 1)")
        if not 0.0 < diff.t_eps < 1.0:
            raise ConfigError(f"diffusion.t_eps={diff.t_eps} must be in (0, 1)")


def _rollout_sampler() -> SamplerConfig:
    return SamplerConfig(max_new_tokens=96, threshold=0.9, temperature=1.0, commit_temperature=0.05)


@dataclass
class RolloutConfig:
    """What the on-policy stage samples and who judges it."""

    tasks: str = "generated:train"  # task set or JSONL file the prompts come from (onpolicy.data.tasks)
    n_tasks: int = 5000  # tasks in the pool (generated sets: how many to generate)
    prompts_per_step: int = 8  # prompts per optimizer step (over all ranks)
    group_size: int = 8  # G samples per prompt (the group of group-relative advantages)
    batch_size: int = 32  # rows the sampler decodes together
    sampler: SamplerConfig = field(default_factory=_rollout_sampler)  # rollout decoding; temperature 1 = the
    # policy itself
    verifier: str = "python-tests"  # a name, package.module:Class, entry point, or
    # package.module:reward_function (TRL)
    verifier_timeout: float = 120.0  # seconds one verify call may take; past it its samples are excluded
    verifier_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the verifier plugin
    pass_threshold: float | None = None  # a score >= this counts as a pass (graded rewards); None: the
    # plugin's own
    log_completions: int = 4  # completions per step written to completions.jsonl with their verdicts (and a
    # wandb table)
    strict: bool | None = None  # return-value check (verifiers.base): None = each task's own (generated: on)
    dynamic_sampling: int = 0  # DAPO: up to N extra rounds of fresh prompts in place of groups whose rewards
    # do not vary


@dataclass
class RewardConfig:
    """docs/method.md, equation (4): correctness V and trajectory length K (forwards) over L (decoded
    tokens)."""

    form: str = "multiplicative"  # multiplicative: V * ((L - K + 1) / L)^alpha | additive: V - lam * K / L
    alpha: float = 0.5  # exponent of the multiplicative form (0 = accuracy only)
    lam: float = 0.5  # weight of K / L in the additive form (0 = accuracy only)
    scale_rewards: str = "group"  # group | batch | none: what the centred rewards are divided by
    min_speed_spread: int = 2  # a group where every sample passed and step counts differ by fewer forwards
    # than this gets no advantage (its reward differences are commit-sampling noise); 0 = keep every group


@dataclass
class LossConfig:
    """The terms of the stage-4 loss (each a pure function in onpolicy.diffusion.policy)."""

    loss_type: str = "dapo"  # grpo | dr_grpo | dapo: how policy-gradient terms are averaged
    epsilon: float = 0.2  # PPO clip below 1
    epsilon_high: float = 0.28  # PPO clip above 1 (DAPO's clip-higher)
    pg_weight: float = 1.0  # weight of the policy-gradient term (0 = surrogates only)
    updates_per_batch: int = 1  # optimizer steps on each step's rollouts (PPO epochs): past the first, the
    # ratio leaves 1 and the clip binds (the token term's old log-probs are the rollout's, the decisions' the
    # first update's)
    commit_actions: bool = True  # soft commits: the commit decisions' log-probability joins the policy term
    surrogate: str = "jump"  # none | progress | jump | both: the edit-distance surrogate(s) of equation (5)
    # of docs/method.md
    progress_lambda: float = 0.5  # progress cost: step k costs lambda / max(p_k, 1) on passing trajectories
    jump_weight: float = 1.0  # verified jump distillation weight
    jump_gap_start: int = 2  # steps jumped at the start (from s_j straight to s_j+gap) ...
    jump_gap_end: int = 8  # ... growing linearly to this at the last step
    certainty: float = 0.3  # entropy of correct predictions (dParallel's certainty forcing)
    distill_passed: float = 1.0  # jump-distillation weight of verified rollouts (0 with pg_weight=0 and
    # anchor > 0: supervised fine-tuning on the references alone, a control)
    distill_failed: float = 0.0  # jump-distillation weight of failed rollouts that carry no policy gradient
    # (advantage 0: all-fail groups), a self-distillation of the model's own paths (dParallel); a failed row
    # with a negative advantage is never distilled, which would push toward the very tokens its advantage
    # pushes away from
    distill_rows: int = 16  # at most this many failed rollouts per step join for it (seeded pick: each costs
    # a replay)
    jump_states: str = "every"  # rows that feed only the jump term (failed rows picked above, buffer rows,
    # groups without reward variance): "every" replays each of their steps; "sampled" one seeded state per
    # block, one forward
    beta: float = 0.0  # KL to the frozen start (with LoRA: the base, adapters off); 0 = none
    buffer_size: int = 0  # verified trajectories kept for the surrogates (mode filtering); 0 = current step
    # only
    buffer_rows: int = 16  # of them replayed per step (surrogate terms only: they are off-policy)
    anchor: float = 0.0  # weight of the reference solutions of the step's prompts in the jump term, each in a
    # random order within its blocks (a supervised denoising loss on ground truth against drift, as
    # InstructGPT's PPO-ptx mixes in pre-training); tasks without a `canonical_solution` add nothing. 0 = none
    # (block-causal models)
    anchor_rows: int = 16  # at most this many reference solutions per step


@dataclass
class ValidationConfig:
    """Validation pass@1 on a schedule, the best checkpoint, early stopping."""

    tasks: str = "generated:validation"  # task set for validation
    n_tasks: int = 100  # tasks per validation
    every: int = 10  # steps between validations (0 = start and end only)
    fast_threshold: float = 0.5  # the fast decoding validated beside one token per step (greedy threshold)
    quality_tolerance: float = 0.02  # best = most tokens per forward (fast) with both pass@1 within this of
    # the start
    patience: int = 0  # stop after this many validations without a new best (0 = never stop early)


@dataclass
class OnPolicyConfig:
    """Stage 4: the model samples, the sandbox judges, the loss makes correct paths short."""

    stage: str = "onpolicy"
    # model.init_from: the stage's starting model (required)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # fine-tuning, not pre-training
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, weight_decay=0.0))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    # keys this stage takes from elsewhere: set in a recipe or override, they are refused with the reason
    UNUSED: typing.ClassVar[dict[str, str]] = {
        **{f"model.{k}": "the model and its shape come from model.init_from" for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "rope_theta", "attention", "block_size", "shift_logits")},
        "train.eval_every": "stage 4 validates on validation.every",
        "train.eval_batches": "stage 4 validates on validation.n_tasks tasks",
        "train.grad_accum": "stage 4 accumulates over its step's rows (rollout.prompts_per_step x group_size "
                            "/ micro_batch_size)",
        "logging.log_every": "stage 4 logs every step",
    }

    def validate(self) -> None:
        check_common(self)
        r, rw, loss = self.rollout, self.reward, self.loss
        if not self.model.init_from:
            raise ConfigError("stage onpolicy starts from a trained model: set model.init_from=FOLDER")
        check_task_sets(rollout__tasks=r.tasks, validation__tasks=self.validation.tasks)
        check_verifier("rollout.verifier", r.verifier)
        _one_of(rw.form, REWARD_FORMS, "reward.form")
        _one_of(rw.scale_rewards, SCALE_REWARDS, "reward.scale_rewards")
        _one_of(loss.jump_states, JUMP_STATES, "loss.jump_states")
        _one_of(loss.loss_type, LOSS_TYPES, "loss.loss_type")
        _one_of(loss.surrogate, SURROGATES, "loss.surrogate")
        if r.group_size < 2:
            raise ConfigError("rollout.group_size must be >= 2 (advantages are relative to the group)")
        if r.dynamic_sampling < 0:
            raise ConfigError("rollout.dynamic_sampling must be >= 0 (extra rounds of fresh prompts), got "
                              f"{r.dynamic_sampling}")
        if r.sampler.remask_threshold is not None:
            raise ConfigError("rollout.sampler.remask_threshold: self-correction makes trajectories "
                              "unreplayable; leave it unset")
        if loss.commit_actions and r.sampler.commit_temperature is None:
            raise ConfigError("loss.commit_actions needs soft commits: set "
                              "rollout.sampler.commit_temperature (and threshold)")
        if r.sampler.commit_temperature is not None and r.sampler.threshold is None:
            raise ConfigError("rollout.sampler.commit_temperature needs rollout.sampler.threshold")
        if rw.min_speed_spread < 0:
            raise ConfigError(f"reward.min_speed_spread must be >= 0 (forwards), got {rw.min_speed_spread}")
        if loss.updates_per_batch < 1 or loss.distill_passed < 0:
            raise ConfigError("loss.updates_per_batch must be >= 1 and loss.distill_passed >= 0, got "
                              f"{loss.updates_per_batch}, "
                              f"{loss.distill_passed}")
        if loss.distill_failed < 0 or loss.distill_rows < 0:
            raise ConfigError("loss.distill_failed and loss.distill_rows must be >= 0, got "
                              f"{loss.distill_failed}, {loss.distill_rows}")
        if loss.anchor < 0 or loss.anchor_rows < 0:
            raise ConfigError(f"loss.anchor and loss.anchor_rows must be >= 0, got {loss.anchor}, "
                              f"{loss.anchor_rows}")
        if loss.anchor > 0 and loss.surrogate not in ("jump", "both"):
            raise ConfigError("loss.anchor feeds the jump term: set loss.surrogate to jump or both (it is "
                              f"{loss.surrogate})")
        if self.train.micro_batch_size < 1 or not 1 <= loss.jump_gap_start <= loss.jump_gap_end:
            raise ConfigError("loss.jump_gap_start must be >= 1 and <= loss.jump_gap_end")


def _pool_sampler() -> SamplerConfig:
    return SamplerConfig(max_new_tokens=96, temperature=0.6)


@dataclass
class PoolConfig:
    """Stage 3's trajectory pool: the starting model samples, the verifier judges, the best are kept."""

    tasks: str = "generated:train"  # task set or JSONL file the prompts come from
    n_tasks: int = 500  # prompts sampled
    samples: int = 4  # N trajectories per prompt
    keep: int = 1  # trajectories kept per prompt: verified ones first, then by `prefer`
    prefer: str = "likely"  # among verified: "fast" (fewest forwards) or "likely" (highest path
    # log-likelihood)
    require_pass: bool = True  # keep verified trajectories only (False: failing ones may fill a prompt's
    # slots)
    batch_size: int = 32  # rows the sampler decodes together
    sampler: SamplerConfig = field(default_factory=_pool_sampler)  # one token per step (the order is what is
    # learnt)
    verifier: str = "python-tests"  # as rollout.verifier
    verifier_timeout: float = 120.0
    verifier_args: dict[str, Any] = field(default_factory=dict)  # as rollout.verifier_args
    pass_threshold: float | None = None  # as rollout.pass_threshold
    strict: bool | None = None  # return-value check; None = each task's own
    path: str | None = None  # a pool file to reuse (default: <output_dir>/pool.jsonl, built if missing)


@dataclass
class OrderValidationConfig:
    """pass@1 at the start and the end (and every `every` steps), one token per step and fast."""

    tasks: str = "generated:validation"
    n_tasks: int = 100
    every: int = 0  # steps between validations (0 = start and end only)
    fast_threshold: float = 0.5


@dataclass
class OrderConfig:
    """Stage 3: constrained-order distillation on the model's own best trajectories (docs/method.md, stage
    3)."""

    stage: str = "order"
    model: ModelConfig = field(default_factory=ModelConfig)  # model.init_from: the starting model (required)
    pool: PoolConfig = field(default_factory=PoolConfig)
    validation: OrderValidationConfig = field(default_factory=OrderValidationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    UNUSED: typing.ClassVar[dict[str, str]] = {
        **{f"model.{k}": "the model and its shape come from model.init_from" for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "rope_theta", "attention", "block_size", "shift_logits")},
        "train.eval_every": "stage 3 validates on validation.every",
        "train.eval_batches": "stage 3 validates on validation.n_tasks tasks",
    }

    def validate(self) -> None:
        check_common(self)
        pl = self.pool
        check_task_sets(pool__tasks=pl.tasks, validation__tasks=self.validation.tasks)
        check_verifier("pool.verifier", pl.verifier)
        if not self.model.init_from:
            raise ConfigError("stage order starts from a trained model: set model.init_from=FOLDER")
        if pl.samples < 1 or pl.keep < 1 or pl.keep > pl.samples:
            raise ConfigError(f"pool.keep={pl.keep} must be between 1 and pool.samples={pl.samples}")
        if pl.prefer not in ("fast", "likely"):
            raise ConfigError(f"pool.prefer='{pl.prefer}' is not one of: fast, likely")
        if pl.sampler.remask_threshold is not None:
            raise ConfigError("pool.sampler.remask_threshold: self-correction makes trajectories "
                              "unreplayable; leave it unset")


# stage name -> (schema, "module:function" of its trainer; imported only when the stage runs)
STAGES: dict[str, tuple[type, str]] = {
    "pretrain": (PretrainConfig, "onpolicy.trainers.pretrain:train"),
    "order": (OrderConfig, "onpolicy.trainers.order:train"),
    "onpolicy": (OnPolicyConfig, "onpolicy.trainers.onpolicy:train"),
}
# keys that existed once, and what replaced them
REMOVED_KEYS = {
    "diffusion.objective": "the objective follows model.attention (causal: next-token; bidirectional or "
                           "block_causal: mask diffusion)",
}


def register_stage(name: str, schema: type, trainer: str) -> None:
    """Add a stage: its config dataclass (with a `validate` method) and its trainer as "module:function"."""
    STAGES[name] = (schema, trainer)


def stage_trainer(name: str):
    """The train(cfg) function of a stage."""
    module, _, func = STAGES[name][1].partition(":")
    return getattr(importlib.import_module(module), func)


def _check_keys(data: Any, schema: type, where: str) -> None:
    """Raise ConfigError for the first key in `data` that `schema` does not have."""
    if not isinstance(data, dict):
        return
    valid = {f.name: f for f in fields(schema)}
    hints = typing.get_type_hints(schema)
    for key, value in data.items():
        if f"{where}{key}" in REMOVED_KEYS:
            raise ConfigError(f"config key '{where}{key}' was removed: {REMOVED_KEYS[f'{where}{key}']}")
        if key not in valid:
            hint = difflib.get_close_matches(str(key), valid, n=1)
            maybe = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(
                f"unknown config key '{where}{key}'{maybe}; valid keys under '{where or '<top>'}': "
                + ", ".join(sorted(valid))
            )
        sub = hints.get(key)
        if isinstance(sub, type) and is_dataclass(sub):
            _check_keys(value, sub, f"{where}{key}.")


def _dotlist_to_dict(overrides: list[str]) -> dict:
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
    return out


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[Path, dict]:
    """(the file found, its keys) of a recipe: a file here, else one of the shipped recipes. A recipe may
    start from another with `base: OTHER.yaml` (beside it, else a path as for `onpolicy train`): the base's
    keys, then this file's over them, mapping by mapping; a list or a value replaces the base's whole."""
    from onpolicy.recipes import find_recipe

    path = find_recipe(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except yaml.YAMLError as e:  # the line and column where the parser stopped
        raise ConfigError(yaml_problem(path, e)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = raw.pop("base", None)
    if base is None:
        return path, raw
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: its `base:` chain comes back to it ({' -> '.join(str(p) for p in _seen)} "
                          f"-> {path})")
    beside = path.parent / str(base)
    try:
        _, under = read_recipe(beside if beside.is_file() else base, (*_seen, path.resolve()))
    except FileNotFoundError:
        raise ConfigError(f"{path}: base: {base}: no such recipe (looked beside it, here and among "
                          "onpolicy's recipes)") from None
    return path, OmegaConf.to_container(OmegaConf.merge(under, raw), resolve=False)


def load_config(path: str | Path | None, overrides: list[str] | None = None, stage: str | None = None) -> Any:
    """Read a recipe YAML (optional) plus `key=value` overrides into the stage's dataclass."""
    raw: dict = {}
    if path is not None:
        path, raw = read_recipe(path)
    over = _dotlist_to_dict(overrides or [])
    stage = stage or over.get("stage") or raw.get("stage")
    if stage is None:
        raise ConfigError(f"{path or 'config'}: no stage; did you forget `stage: ...` at the top? (one of: "
                          f"{', '.join(STAGES)})")
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; valid stages: {', '.join(STAGES)}")
    schema = STAGES[stage][0]
    _check_keys(raw, schema, "")
    _check_keys(over, schema, "")
    unused = getattr(schema, "UNUSED", {})
    for key in [*_leaves(raw), *_leaves(over)]:
        if key in unused:
            raise ConfigError(f"{key}: stage {stage} does not use it ({unused[key]}); remove it from "
                              f"{path or 'the overrides'}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw, over)
    except Exception as e:  # type errors: "train.max_steps=ten"; OmegaConf's message runs over several lines
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{path or 'config'}: "
                          + (f"{key}: " if key else "") + str(e).splitlines()[0]) from None
    given = _leaves(over)
    missing = [k for k, v in _leaves(raw).items() if v == "???" and given.get(k, "???") == "???"]
    if missing:  # `???` in a recipe: a value the user must give (and did not, by override)
        raise ConfigError(f"{path or 'config'}: set {', '.join(missing)} (e.g. {missing[0]}=...); the recipe "
                          "leaves it to you")
    cfg = OmegaConf.to_object(merged)
    cfg.validate()
    return cfg


def _leaves(node: Any, where: str = "") -> dict[str, Any]:
    """{dotted key: value} of every leaf of a nested mapping."""
    if not isinstance(node, dict):
        return {where[:-1]: node}
    return {k: v for key, value in node.items() for k, v in _leaves(value, f"{where}{key}.").items()}


def _one_of(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key}='{value}' is not one of: {', '.join(options)}")


def check_common(cfg) -> None:
    """Checks of the sections every stage shares (model, train, logging, lora)."""
    m, t = cfg.model, cfg.train
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "block_size"):
        if getattr(m, key, 1) is not None and getattr(m, key, 1) < 1:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be >= 1")
    data = getattr(cfg, "data", None)
    if data is not None and data.seq_len < 1:
        raise ConfigError(f"data.seq_len={data.seq_len} must be >= 1")
    if not t.lr > 0:
        raise ConfigError(f"train.lr={t.lr} must be > 0")
    if t.weight_decay < 0 or t.warmup_steps < 0:
        raise ConfigError("train.weight_decay and train.warmup_steps must be >= 0")
    _one_of(m.attention, (*ATTENTION_MODES, INHERIT), "model.attention")
    if m.attention == INHERIT and not m.init_from:
        raise ConfigError("model.attention=inherit keeps model.init_from's attention: set model.init_from")
    _one_of(m.attention_kernel, ATTENTION_KERNELS, "model.attention_kernel")
    _one_of(t.precision, PRECISIONS, "train.precision")
    _one_of(cfg.logging.wandb, WANDB_MODES, "logging.wandb")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                          f"model.num_attention_heads={m.num_attention_heads}")
    if (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError("RoPE needs an even head size (model.hidden_size / model.num_attention_heads)")
    if m.shift_logits and m.attention == "causal":
        raise ConfigError("model.shift_logits is for diffusion models (a causal model's loss shifts already)")
    for key in ("max_steps", "micro_batch_size", "grad_accum", "eval_batches"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1")
    if len(t.betas) != 2:
        raise ConfigError("train.betas must have two values")
    if cfg.lora.r < 0 or not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError("lora.r must be >= 0 (0 = off) and lora.dropout in [0, 1)")
    for name in cfg.lora.target_modules or []:
        if name not in LORA_TARGETS:
            raise ConfigError(f"lora.target_modules: '{name}' names no linear layer of the model; valid: "
                              f"{', '.join(LORA_TARGETS)}")


# The linear layers of onpolicy.model.DiffusionTransformer (every model, outside ones included, is mapped
# onto it), by the names LoRA targets take; tests/test_config.py checks the list against the model.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def check_init_from(cfg) -> None:
    """`model.init_from` names something that can exist (checked when a run starts, not when a recipe is
    read: a recipe may name a start that is built later)."""
    spec = cfg.model.init_from
    if spec and not _could_be_model(str(spec)):
        raise ConfigError(f"model.init_from: no such model folder or file: {spec} "
                          "(a folder written by onpolicy, a run folder, an adapter folder, a .gguf file, "
                          "smollm2 or a Hub id org/name)")


def _could_be_model(spec: str) -> bool:
    """An existing path, a name onpolicy knows (smollm2) or something shaped like a Hub id (org/name)."""
    import re

    return (Path(spec).exists() or spec == "smollm2"
            or re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", spec) is not None)


def check_verifier(key: str, spec: str) -> None:
    """The verifier plugin `spec` can be found and imported, or a one-line ConfigError naming `key`."""
    from verifiers.registry import resolve

    try:
        resolve(spec)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def check_task_sets(**sets: str) -> None:
    """Each `key=name` a loadable task set, or a one-line ConfigError naming the key (before anything
    runs)."""
    from onpolicy.data.tasks import check_task_set

    for key, name in sets.items():
        try:
            check_task_set(name)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"{key.replace('__', '.')}: {e}") from None
