"""The `onpolicy` command.

    onpolicy train RECIPE.yaml [key=value ...] [--nproc N]
    onpolicy sample CHECKPOINT --prompt "def add(a, b):"
    onpolicy verify TASKS.jsonl COMPLETIONS.jsonl --out RESULTS.jsonl
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
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch(args, cfg)
    from onpolicy.trainers.mask import train

    train(cfg)
    return 0


def _relaunch(args: argparse.Namespace, cfg) -> int:
    """Re-run this command under torchrun with N ranks (gloo on CPU, NCCL on GPUs)."""
    from onpolicy.engine import _free_port

    # torchrun leaves torchelastic_* folders in the temp dir: give it one the run owns.
    tmp = Path(cfg.data.cache_dir, "tmp", f"torchrun-{os.getpid()}").resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
        f"--master_port={_free_port()}", "-m", "onpolicy.cli", "train", args.recipe, *args.overrides,
    ]
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        return subprocess.call(cmd, env=env)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _sample(args: argparse.Namespace) -> int:
    import torch

    from onpolicy.checkpoint import load_pretrained
    from onpolicy.sampling import SamplerConfig, generate
    from onpolicy.tokenizer import SpecialTokens

    model, tokenizer = load_pretrained(args.checkpoint)
    special = SpecialTokens.from_tokenizer(tokenizer)
    cfg = SamplerConfig(
        max_new_tokens=args.max_new_tokens,
        block_size=args.block_size,
        steps_per_block=args.steps,
        threshold=args.threshold,
        temperature=args.temperature,
        use_cache=not args.no_cache,
    )
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in args.prompt]
    traj = generate(model, prompts, special, cfg, generator=torch.Generator().manual_seed(args.seed))
    for text, ids in zip(args.prompt, traj.tokens):
        print(text + tokenizer.decode(ids))
    print(f"# {sum(map(len, traj.tokens))} tokens in {traj.forwards} forwards ({traj.tokens_per_forward:.2f} tokens/forward)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onpolicy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher passes --local_rank=N; the rank is read from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe (stage chosen by its `stage:` key)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/stage1_mask.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--nproc", type=int, default=1, help="processes (ranks) on this machine; >1 relaunches under torchrun")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="generate code from a checkpoint")
    p.add_argument("checkpoint", help="an HF folder written by onpolicy (or a run folder: its final/ is used)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=None, help="default: the model's block size")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per block (default: one token per step)")
    p.add_argument("--threshold", type=float, default=None, help="commit every token above this confidence")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every step (for checking the cache)")
    p.set_defaults(func=_sample)

    from verifiers.cli import add_verify_arguments, run_verify

    p = sub.add_parser("verify", help="score completions with a sandboxed verifier")
    add_verify_arguments(p)
    p.set_defaults(func=run_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options (`train R --nproc 2 a=1 b=2`)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "train" or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from onpolicy.config import ConfigError
    from onpolicy.engine import CheckpointError
    from verifiers.sandbox import SandboxUnavailable

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, CheckpointError, SandboxUnavailable) as e:
        print(f"onpolicy {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
