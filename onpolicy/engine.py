"""DeepSpeed ZeRO around any of our models: distributed set-up (GPU/NCCL or CPU/gloo), the engine, and
export of the final model as an HF folder. Resumable checkpoints are in `onpolicy.checkpoint`.

CPU notes (docs/troubleshooting.md): DS_ACCELERATOR=cpu and the gloo backend; DeepSpeed JIT-compiles its
shared-memory comm op on first use, and two ranks compiling at once crash, so the build runs once
under a file lock into a project cache folder (TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(cache_dir: str | Path = ".cache/onpolicy", threads: int | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (one process works too) and pick the device."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ext_dir = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                                         str(Path(cache_dir, "torch_extensions").resolve())))
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if not cuda:
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // max(1, world)))
    import deepspeed

    if not cuda:
        _prebuild_cpu_ops(ext_dir)
    with contextlib.redirect_stdout(io.StringIO()):  # its "... built successfully" line on every start
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return DistInfo(int(os.environ["RANK"]), local_rank, world, device)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prebuild_cpu_ops(ext_dir: Path) -> None:
    """Build (or load the cached) shm comm op one process at a time, so ranks never race."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        return
    ext_dir.mkdir(parents=True, exist_ok=True)
    with open(ext_dir / ".onpolicy-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not any(ext_dir.glob(f"{builder.name}*")) and os.environ.get("RANK", "0") == "0":
                print(f"[onpolicy] building DeepSpeed's CPU communication op into {ext_dir} (once, ~25 s)",
                      flush=True)
            # DeepSpeed prints "... built successfully" every time
            with contextlib.redirect_stdout(io.StringIO()):
                builder.load(verbose=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all ranks (itself on one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / dist.get_world_size()
    return value


def shutdown() -> None:
    """Barrier then destroy the process group (avoids ZeRO-2's abort at exit, docs/troubleshooting.md)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def deepspeed_config(path: str, micro_batch_size: int, grad_accum: int, world_size: int, grad_clip: float,
                     precision: str = "fp32", hidden_size: int | None = None) -> dict:
    """Read a DeepSpeed JSON file (a path, or one of the shipped recipes/deepspeed/*.json) and fill it
    from the recipe; nothing "auto" is passed through to DeepSpeed.

    Hugging Face-style `"auto"` fields are filled as transformers' integration fills them: the batch
    geometry and clipping from train.*, the ZeRO bucket sizes from the model's hidden size, bf16 from
    `train.precision` (bf16: bf16 weights, fp32 master weights in the optimizer). `optimizer` and
    `scheduler` blocks whose values are all "auto" are dropped (train.* define AdamW and the schedule);
    concrete values there, or a value that contradicts the recipe, are refused naming the key."""
    from onpolicy.recipes import find_recipe

    try:
        p = find_recipe(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"train.deepspeed: {e}") from None
    cfg = json.loads(p.read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        if cfg.get(key, "auto") != "auto":
            raise ValueError(f"{p}: '{key}' is set from the recipe (train.*); write \"auto\" or leave it out")
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch_size * grad_accum * world_size
    cfg["gradient_clipping"] = grad_clip
    if (cfg.get("fp16") or {}).get("enabled") not in (None, False, "auto"):
        raise ValueError(f"{p}: fp16 is not supported (use train.precision: bf16 or fp32)")
    cfg.pop("fp16", None)
    bf16 = dict(cfg.get("bf16") or {})
    if bf16.get("enabled", "auto") not in ("auto", precision == "bf16"):
        raise ValueError(f"{p}: bf16.enabled is {bf16['enabled']} but train.precision is {precision}; "
                         "write \"auto\" (or leave the bf16 block out) and set train.precision")
    cfg["bf16"] = {**bf16, "enabled": precision == "bf16"}
    for block in ("optimizer", "scheduler"):
        params = (cfg.get(block) or {}).get("params", {})
        concrete = sorted(k for k, v in params.items() if v != "auto")
        if concrete:
            raise ValueError(f"{p}: {block}.params {concrete} are set from the recipe (train.lr, "
                             "train.betas, "
                             f"train.weight_decay, train.warmup_steps); write \"auto\" or remove the {block} "
                             "block")
        cfg.pop(block, None)
    zero = cfg.get("zero_optimization") or {}
    buckets = {"reduce_bucket_size": lambda h: h * h,
               "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
               "stage3_param_persistence_threshold": lambda h: 10 * h}
    for key, fill in buckets.items():
        if zero.get(key) == "auto":
            if hidden_size is None:
                raise ValueError(f"{p}: zero_optimization.{key} is \"auto\" but the model's hidden size is "
                                 "unknown here")
            zero[key] = fill(hidden_size)
    left = _auto_keys(cfg)
    if left:
        raise ValueError(f"{p}: {', '.join(left)} are \"auto\", which onpolicy does not know how to fill; "
                         "give values")
    cfg.setdefault("steps_per_print", 1 << 30)  # we log ourselves
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def _auto_keys(node, where: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _auto_keys(value, f"{where}{key}.")]
    return [where[:-1]] if node == "auto" else []


def step(engine) -> None:
    """engine.step(), noting the global gradient norm (before clipping) at an optimizer step where
    DeepSpeed keeps none (ZeRO-0 in fp32: plain torch gradients, read here before they are cleared)."""
    if (engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0
            and not engine.bfloat16_enabled()):
        grads = [p.grad.detach().norm() for p in engine.module.parameters() if p.grad is not None]
        engine.onpolicy_grad_norm = torch.linalg.vector_norm(torch.stack(grads)) if grads else None
    engine.step()


def grad_norm(engine):
    """The global gradient norm of the last optimizer step, before clipping (a tensor or float; None
    when unknown). Read when logged, not per step."""
    norm = engine.get_global_grad_norm()
    return norm if norm is not None else getattr(engine, "onpolicy_grad_norm", None)


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float]) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # a parameter ZeRO-3 has partitioned keeps its real shape in ds_shape
    is_matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]
    decay = [p for p, m in zip(params, is_matrix) if m]
    no_decay = [p for p, m in zip(params, is_matrix) if not m]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # DeepSpeed drops empty groups; the LR scheduler must agree
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def initialize(model, optimizer, scheduler, ds_config: dict):
    """deepspeed.initialize with a torch optimizer (no JIT-compiled fused Adam needed)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


@contextlib.contextmanager
def full_parameters(engine):
    """The engine's module with whole parameters inside the block (gathered from ZeRO-3 shards on every
    rank; a no-op otherwise)."""
    import deepspeed

    model = engine.module
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield model
    else:
        yield model
