"""Glue every stage trainer shares: seeded generators, batch order, autocast, data preparation,
model building (with the LoRA switch, applied here once), the LR schedule, resume and export.
Stage trainers keep only their own loop; benchmarks import from here too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from onpolicy import checkpoint as ckpt
from onpolicy import engine as eng
from onpolicy.config import INHERIT
from onpolicy.lora import apply_lora
from onpolicy.model import DiffusionTransformer, DiffusionTransformerConfig
from onpolicy.tokenizer import SpecialTokens


def noise_generator(seed: int, *stream: int) -> torch.Generator:
    """A generator for one (step, micro-batch, rank, ...) stream, independent of global RNG state."""
    digest = hashlib.sha256(repr((seed, *stream)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


def batch_rows(step: int, micro: int, rank: int, world: int, micro_bs: int, grad_accum: int, n_rows: int,
               seed: int) -> torch.Tensor:
    """Row indices of the micro-batch (step, micro, rank): epochs are seeded permutations, in order,
    so every row is seen once per epoch and a resumed run sees the same rows."""
    global_bs = micro_bs * grad_accum * world
    first = step * global_bs + (micro * world + rank) * micro_bs
    idx = torch.arange(first, first + micro_bs)
    out = torch.empty_like(idx)
    for epoch in idx.div(n_rows, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n_rows, generator=noise_generator(seed, -1, epoch))
        sel = idx.div(n_rows, rounding_mode="floor") == epoch
        out[sel] = perm[idx[sel] % n_rows]
    return out


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_data(cfg, builder: bool):
    """(tokenizer, memory-mapped corpus, special tokens). The tokenizer follows the model: a run that
    starts from `model.init_from` uses that model's own tokenizer (a `tokenizer.path` that differs in
    content is refused); otherwise `tokenizer.path`, else a BPE trained on the data. `builder`
    processes (local rank 0: one per node, so node-local cache folders work too) build and cache; the
    others then map the cache. Builders racing on a shared filesystem are safe (onpolicy.files)."""
    from onpolicy.data.corpus import build_corpus, load_documents, split_documents
    from onpolicy.loading import load_model_tokenizer
    from onpolicy.tokenizer import check_same_tokenizer, load_tokenizer, prepare_tokenizer

    init = cfg.model.init_from
    for turn in (0, 1):
        if (turn == 0) == builder:
            docs = load_documents(cfg.data)
            if os.environ.get("RANK", "0") == "0":
                print(f"[onpolicy] data: {len(docs):,} documents ({cfg.data.source}"
                      + (f", {cfg.data.task_fraction:.0%} generated tasks"
                         if getattr(cfg.data, "task_fraction", 0) else "")
                      + f"); tokenizer and token shards cached in {Path(cfg.data.cache_dir).resolve()} "
                        "(built on the first run)",
                      flush=True)
            if init:
                tokenizer = load_model_tokenizer(init)
                if cfg.tokenizer.path is not None:
                    check_same_tokenizer(load_tokenizer(cfg.tokenizer.path), tokenizer,
                                         f"tokenizer.path={cfg.tokenizer.path}", init)
            else:
                train_docs, _ = split_documents(docs, cfg.data.val_fraction)
                tokenizer = prepare_tokenizer(cfg.tokenizer.path, cfg.tokenizer.vocab_size,
                                              [d.text for d in train_docs], cfg.data.cache_dir,
                                              cfg.tokenizer.train_max_mb)
            corpus = build_corpus(cfg.data, tokenizer, docs)
        eng.barrier()
    return tokenizer, corpus, SpecialTokens.from_tokenizer(tokenizer)


def model_hidden_size(m) -> int | None:
    """The hidden size of the model a run trains (DeepSpeed's "auto" bucket sizes): the recipe's, or
    model.init_from's own (None for a .gguf, whose config is inside the file)."""
    if not m.init_from:
        return m.hidden_size
    from onpolicy.hf_causal import is_gguf
    from onpolicy.loading import ADAPTER_CONFIG, adapter_base, resolve_model_dir

    if is_gguf(m.init_from):
        return None
    folder = resolve_model_dir(m.init_from)
    if (folder / ADAPTER_CONFIG).exists():
        folder = resolve_model_dir(adapter_base(folder))
    return json.loads((folder / "config.json").read_text()).get("hidden_size")


def build_model(cfg, special: SpecialTokens, adapt_attention: bool = True) -> torch.nn.Module:
    """The stage's model: from `model.init_from` or fresh from `model.*` (whole; ZeRO-3 partitions it later);
    with `lora.r > 0` wrapped in PEFT LoRA adapters. adapt_attention: give an init_from model the
    recipe's attention, block size and shift (pre-training); False keeps the model's own (later stages)."""
    m = cfg.model
    if m.init_from:
        from onpolicy.loading import load_pretrained

        model, _ = load_pretrained(m.init_from)
        model.train()
        if model.config.vocab_size != special.vocab_size:
            raise ValueError(f"model.init_from has vocab {model.config.vocab_size}, tokenizer has "
                             f"{special.vocab_size}")
        if adapt_attention and m.attention != INHERIT:
            # AR-to-diffusion adaptation (Dream, DiffuCoder, SDAR): the same weights, with the attention
            # pattern this recipe trains (e.g. a causal baseline continued as block-causal diffusion).
            for key in ("attention", "block_size", "shift_logits"):
                setattr(model.config, key, getattr(m, key))
        # the recipe now describes the model it trains (`inherit` and later stages: the model's own)
        for key in ("attention", "block_size", "shift_logits"):
            setattr(m, key, getattr(model.config, key))
    else:
        mcfg = DiffusionTransformerConfig(
            vocab_size=special.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_hidden_layers,
            num_attention_heads=m.num_attention_heads, intermediate_size=m.intermediate_size,
            max_position_embeddings=m.max_position_embeddings, rope_theta=m.rope_theta, attention=m.attention,
            block_size=m.block_size, shift_logits=m.shift_logits, mask_token_id=special.mask,
            pad_token_id=special.pad, bos_token_id=special.bos, eos_token_id=special.eos,
        )
        # built whole on every ZeRO stage, so a seed gives the same initial weights under ZeRO-0, 2 and 3
        # (deepspeed.zero.Init draws them partition by partition: other numbers); ZeRO-3 partitions the
        # built model when the engine starts, as it does a model loaded with `init_from`
        model = DiffusionTransformer(mcfg)
    model.config.attention_kernel = m.attention_kernel
    model.gradient_checkpointing = cfg.train.gradient_checkpointing
    return apply_lora(model, cfg.lora, verbose=os.environ.get("RANK", "0") == "0")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The DiffusionTransformer inside a DeepSpeed engine and/or a PEFT wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def make_scheduler(optimizer, t) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return eng.warmup_cosine(step, t.warmup_steps, t.max_steps, t.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_engine(cfg, model: torch.nn.Module, ds_config: dict):
    """(DeepSpeed engine, scheduler) with the project's AdamW (decay on matrices only) and LR schedule."""
    t = cfg.train
    optimizer = eng.make_optimizer(model, t.lr, t.weight_decay, tuple(t.betas))
    scheduler = make_scheduler(optimizer, t)
    return eng.initialize(model, optimizer, scheduler, ds_config), scheduler


def plan_resume(out: Path, resume: bool | str, world_size: int) -> ckpt.ResumePlan:
    """The checkpoint to resume from (train.resume: the newest complete one under out/checkpoints, or
    a chosen folder), and whether it needs the universal path (saved by another number of processes):
    known before the engine is built."""
    return ckpt.plan_resume(out / "checkpoints", resume, world_size)


def resumed_grad_accum(plan: ckpt.ResumePlan, micro_batch_size: int, grad_accum: int, world_size: int) -> int:
    """Gradient accumulation that keeps a resumed run's global batch when the world size changed (the
    same rows per step, so the run goes on as it would have)."""
    from onpolicy.errors import ConfigError

    saved = plan.saved_global_batch
    if not plan.universal or not saved:
        return grad_accum
    if saved % (micro_batch_size * world_size):
        raise ConfigError(f"{plan.folder} was saved with a global batch of {saved} sequences by "
                          f"{plan.saved_world_size} processes; {world_size} processes x "
                          f"train.micro_batch_size={micro_batch_size} cannot make it up: choose a micro "
                          f"batch size that divides {saved // world_size}")
    return saved // (micro_batch_size * world_size)


def resume(engine, plan: ckpt.ResumePlan, dist) -> dict:
    """Load the planned checkpoint (if any) on every rank; its client state."""
    return ckpt.load_checkpoint(engine, plan, dist.rank, dist.is_main) if plan.folder is not None else {}


def export(engine, tokenizer, out_dir: Path, is_main: bool, cfg=None, decoding: dict | None = None) -> None:
    """The model as a self-contained folder (onpolicy.export: weights, tokenizer, modeling code, model
    card; `decoding` = its recommended decoding). With LoRA the adapters are merged into a copy, so the
    folder is a plain model (loads without PEFT) and training can go on; the adapters alone are also
    saved in PEFT's format in `<out_dir>-adapter/` (base: model.init_from). A causal (AR) model is
    also written as a plain Llama in `<out_dir>-llama/`."""
    from onpolicy.export import save_model_folder

    card = {"name": Path(out_dir).parent.name}
    if cfg is not None:

        card.update(stage=cfg.stage, base_model=cfg.model.init_from,
                    recipe=run_config_yaml(cfg, engine.module))
    module = engine.module
    if hasattr(module, "merge_and_unload"):
        if engine.zero_optimization_stage() == 3:
            raise NotImplementedError("exporting a LoRA model trained under ZeRO-3 is not supported; use "
                                      "ZeRO-0/1/2")
        import copy

        if is_main:
            card["adapter_params"] = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
            merged = copy.deepcopy(module).merge_and_unload()
            save_model_folder(merged, tokenizer, out_dir, decoding, card)
            save_llama_twin(merged, tokenizer, out_dir)
            save_adapter(module, tokenizer, Path(f"{out_dir}-adapter"),
                         cfg.model.init_from if cfg is not None else None)
        eng.barrier()
        return
    with eng.full_parameters(engine) as model:
        if is_main:
            save_model_folder(model, tokenizer, out_dir, decoding, card)
            save_llama_twin(model, tokenizer, out_dir)
    eng.barrier()


def save_llama_twin(model, tokenizer, out_dir: Path) -> None:
    """A causal (AR) model is also written as a plain transformers Llama in `<out_dir>-llama/`, which
    transformers' generate, TRL and other tools take as it is (onpolicy.convert.to_llama)."""
    if model.config.attention != "causal" or model.config.shift_logits:
        return
    from onpolicy.convert import to_llama

    folder = Path(f"{out_dir}-llama")
    to_llama(model).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def save_adapter(peft_model, tokenizer, folder: Path, base: str | None) -> None:
    """LoRA adapters only (adapter_config.json + adapter_model.safetensors), PEFT's format; the base is
    recorded as a path relative to `folder` when it is a local folder (a Hub id or `smollm2` as given)."""
    # a local base as a path relative to the adapter folder: loads here, names no machine
    if base is not None:
        import os

        local = Path(base)
        peft_model.peft_config["default"].base_model_name_or_path = \
            os.path.relpath(local.resolve(), folder.resolve()) if local.exists() else base
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    write_adapter_card(folder, base)


def write_adapter_card(folder: Path, base: str | None) -> None:
    """The adapter folder's README.md in place of PEFT's (which records the base's local path)."""
    from onpolicy.export import public_base

    hub, name = public_base(base)
    meta = ["---", "library_name: peft", "license: apache-2.0", "tags:", "- onpolicy", "- lora"]
    meta += [f"base_model: {hub}", "---"] if hub else ["---"]
    text = [*meta, "", f"# {folder.name}", "",
            f"LoRA adapters trained with onpolicy on `{name or 'its base model'}`.", "", "```bash",
            f"onpolicy sample {folder.name} --prompt 'def f(' --threshold 0.7   # loads the base, merges the "
            "adapters",
            f"onpolicy merge {folder.name} --out merged-model                         # a plain model folder",
            "```", ""]
    (folder / "README.md").write_text("\n".join(text))


MODEL_SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "rope_theta", "attention", "block_size", "shift_logits")


def run_config_yaml(cfg, model) -> str:
    """The run's config.yaml: the config as it ran, with the model section showing the model's real shape
    (a run from `model.init_from` takes the start's shape, not the recipe's defaults)."""
    from dataclasses import replace

    from omegaconf import OmegaConf

    real = unwrap(model).config
    shape = {k: getattr(real, k) for k in MODEL_SHAPE if hasattr(real, k)}
    return OmegaConf.to_yaml(OmegaConf.structured(replace(cfg, model=replace(cfg.model, **shape))))


def open_run(out: Path, cfg, engine, tokenizer, step: int, dist):
    """Rank 0 writes the run folder's config.yaml and model skeleton (`onpolicy export RUN --step N` needs
    it); every rank gets the run's metrics logger, starting at `step`."""
    from dataclasses import asdict

    from onpolicy.export import save_skeleton
    from onpolicy.metrics import MetricsLogger

    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(run_config_yaml(cfg, engine.module))
        save_skeleton(out, unwrap(engine.module), tokenizer, True)
    lg = cfg.logging
    return MetricsLogger(out, cfg.train.max_steps, step, dist.is_main, lg.wandb, lg.wandb_project,
                         lg.run_name, config=asdict(cfg), progress=lg.progress)


def write_summary(out: Path, summary: dict, is_main: bool) -> None:
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))


def validate(engine, tokenizer, tasks, sampler, fast_threshold: float, batch_size: int, seed: int, verifier,
             rollout_rule: bool = False) -> dict:
    """pass@1 and tokens per forward on validation tasks (greedy), at one token per step ("slow") and
    at the fast threshold ("fast", the hard rule eval and bench use), with `sampler`'s canvas and block
    size (stages 3 and 4). With `rollout_rule` and a soft-commit sampler, also under the rule rollouts
    decode with ("rollout": the soft threshold, the sampler's temperatures): the gap between what stage 4
    optimises and what the claim measures, on every validation."""
    from dataclasses import replace

    from onpolicy.evaluation import evaluate_checkpoint
    from onpolicy.sampling import SamplerConfig

    module = engine.module
    module.eval()
    base = SamplerConfig(max_new_tokens=sampler.max_new_tokens, block_size=sampler.block_size)
    out = {}
    with torch.no_grad():
        rules = [("slow", base), ("fast", replace(base, threshold=fast_threshold))]
        if rollout_rule and sampler.commit_temperature is not None:
            rules.append(("rollout", replace(sampler, remask_threshold=None)))
        for name, cfg in rules:
            r = evaluate_checkpoint(module, tokenizer, tasks, cfg, samples=1, verifier=verifier,
                                    batch_size=batch_size, seed=seed)
            out[name] = {"pass@1": r["pass@1"], "pass@1_ci95": r["pass@1_ci95"],
                         "tokens_per_forward": r["tokens_per_forward"]}
    module.train()
    return out


def flat_validation(val: dict) -> dict:
    return {f"val/{name}/{k}": v for name, r in val.items() if isinstance(r, dict) for k, v in r.items()
            if not isinstance(v, list)}


def describe(val: dict) -> str:
    return ", ".join(f"{name} pass@1 {r['pass@1']:.3f} at {r['tokens_per_forward']:.2f} tokens/forward"
                     for name, r in val.items() if isinstance(r, dict))


def start_from_model(cfg):
    """(output folder, DistInfo, tokenizer, SpecialTokens) of a stage that starts from a trained model
    (stages 3 and 4): distributed set-up, the seed, and the starting model's own tokenizer."""
    from onpolicy.loading import load_model_tokenizer

    dist = eng.setup_distributed(".cache/onpolicy", cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_model_tokenizer(cfg.model.init_from)
    return Path(cfg.logging.output_dir), dist, tokenizer, SpecialTokens.from_tokenizer(tokenizer)


def verifier_pool(spec: str, strict: bool | None, timeout_s: float, key: str, args: dict | None = None,
                  pass_threshold: float | None = None):
    """A background VerifierPool around the verifier `spec` (name, module:Class, entry point, TRL reward
    function) built with `args`; a plugin that cannot be found or built is a one-line ConfigError naming
    `key`."""
    from onpolicy.errors import ConfigError
    from onpolicy.rollout import VerifierPool
    from verifiers.registry import get_verifier, with_pass_threshold

    kwargs = dict(args or {}) | ({} if strict is None else {"strict": strict})
    try:
        return VerifierPool(with_pass_threshold(get_verifier(spec, **kwargs), pass_threshold), timeout_s)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}: {e}") from None
