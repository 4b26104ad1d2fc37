"""Resumable checkpoints: DeepSpeed's own format (sharded optimizer state included), plus integrity
manifests written last. The one home of `CheckpointError`.

Per rank: after DeepSpeed has saved, each rank hashes the files it wrote itself (its
`zero_pp_rank_<r>_*` shards; rank 0 also the shared model-states file) into `MANIFEST.rank<r>.json`;
then rank 0 writes `MANIFEST.json` (step, world size, global batch), which marks the checkpoint
complete. No `MANIFEST.json` = incomplete (skipped on resume); a digest mismatch = corrupt (reported
by file name, nothing loaded). On resume each rank checks only its own shards.

Another world size: a checkpoint saved by N processes is resumed by M != N through DeepSpeed's
universal checkpoint. Rank 0 checks every file, converts the checkpoint once into `<step>/universal`
(`deepspeed.checkpoint.ds_to_universal`, with its own manifest), and every rank loads that with
`checkpoint.load_universal`. The trainer keeps the global batch by changing gradient accumulation.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from onpolicy.errors import CheckpointError
from onpolicy.files import file_digest, publish, temporary_sibling

MANIFEST = "MANIFEST.json"
UNIVERSAL = "universal"
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")
__all__ = ["CheckpointError", "MANIFEST", "ResumePlan", "save_checkpoint", "complete_checkpoints",
           "latest_checkpoint", "verify_checkpoint", "plan_resume", "load_checkpoint"]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank_manifest(rank: int) -> str:
    return f"MANIFEST.rank{rank:05d}.json"


def _owner(name: str) -> int:
    """The rank that wrote a checkpoint file: its ZeRO shard number, else rank 0 (shared files)."""
    match = _RANK_FILE.search(Path(name).name)
    return int(match.group(1)) if match else 0


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, is_main: bool,
                    rank: int = 0, world_size: int = 1, global_batch: int | None = None) -> Path:
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    tag = f"step_{step:08d}"
    # what DeepSpeed's universal-checkpoint converter asks of a client (plain data parallel: no TP/PP info)
    universal = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    client_state = {**client_state, UNIVERSAL_CHECKPOINT_INFO: universal}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    _barrier()
    folder = ckpt_dir / tag
    mine = {str(p.relative_to(folder)): file_digest(p) for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith("MANIFEST") and _owner(p.name) == rank}
    _write_json(folder / _rank_manifest(rank), {"step": step, "rank": rank, "files": mine})
    _barrier()
    if is_main:
        _write_json(folder / MANIFEST, {"step": step, "world_size": world_size, "global_batch": global_batch,
                                        "ranks": [_rank_manifest(r) for r in range(world_size)]})
        done = complete_checkpoints(ckpt_dir)
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return folder


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints whose save finished (they have a manifest), oldest first."""
    return sorted(p for p in ckpt_dir.glob("step_*") if (p / MANIFEST).exists())


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (an interrupted save has no manifest and is skipped)."""
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no {path.name}; the save did not finish") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _check_files(folder: Path, files: dict[str, str]) -> None:
    for name, digest in files.items():
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{folder}: missing file {name}")
        if file_digest(path) != digest:
            raise CheckpointError(f"{folder}: {name} is corrupt (SHA-256 differs from its manifest)")


def verify_checkpoint(folder: Path, rank: int | None = None) -> dict:
    """Check files against their manifests before anything is loaded: `rank`'s own files, or (None)
    every rank's. Returns the checkpoint's MANIFEST.json."""
    manifest = _read(folder / MANIFEST)
    if "files" in manifest:  # a checkpoint from before per-rank manifests: one list, checked whole
        _check_files(folder, manifest["files"])
        return manifest
    ranks = range(len(manifest["ranks"])) if rank is None else [rank]
    for r in ranks:
        _check_files(folder, _read(folder / manifest["ranks"][r])["files"])
    return manifest


@dataclass(frozen=True)
class ResumePlan:
    """What a run resumes from, decided before its engine exists (the universal switch is config)."""

    folder: Path | None = None
    saved_world_size: int | None = None
    saved_global_batch: int | None = None
    universal: bool = False  # saved by another number of processes: load through a universal checkpoint

    def describe(self, step: int, grad_accum: int) -> str:
        """The start line's resume note: empty for a fresh run."""
        note = f", resumed at step {step}" if step else ""
        if self.universal:
            note += f" from {self.saved_world_size} processes (universal checkpoint, grad_accum {grad_accum})"
        return note

    def apply(self, ds_config: dict) -> dict:
        if self.universal:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        return ds_config


def plan_resume(ckpt_dir: Path, resume: bool | str, world_size: int) -> ResumePlan:
    """What to resume from: nothing (False), the newest complete checkpoint in `ckpt_dir` (True), or
    the checkpoint folder `resume` names (`train.resume=PATH`: complete, or a CheckpointError)."""
    if isinstance(resume, str):
        folder = Path(resume)
        if not folder.is_dir():
            raise CheckpointError(f"train.resume={resume}: no such checkpoint folder")
        if not (folder / MANIFEST).is_file():
            raise CheckpointError(f"train.resume={resume}: incomplete checkpoint (no {MANIFEST}; its save "
                                  "did not finish)")
    else:
        folder = latest_checkpoint(ckpt_dir) if resume else None
    if folder is None:
        return ResumePlan()
    manifest = _read(folder / MANIFEST)
    saved = manifest.get("world_size", world_size)
    return ResumePlan(folder, saved, manifest.get("global_batch"), universal=saved != world_size)


def _convert_to_universal(folder: Path) -> Path:
    """DeepSpeed's converter, once (rank 0), into a temporary folder published with its manifest."""
    target = folder / UNIVERSAL
    if (target / MANIFEST).is_file():
        return target
    tmp = temporary_sibling(target)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{folder}: conversion to a universal checkpoint "
                              f"failed:\n{(r.stdout + r.stderr)[-2000:]}")
    files = {str(p.relative_to(tmp)): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    _write_json(tmp / MANIFEST, {"files": files, "source": folder.name})
    publish(tmp, target, lambda f: (f / MANIFEST).is_file())
    return target


def load_checkpoint(engine, plan: ResumePlan | Path, rank: int = 0, is_main: bool = True) -> dict:
    """Load a checkpoint into `engine` (every rank calls it); its client state."""
    if isinstance(plan, Path):
        plan = ResumePlan(plan)
    folder = plan.folder
    if not plan.universal:
        verify_checkpoint(folder, rank)
        path, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    else:
        error = None
        if is_main:
            try:
                verify_checkpoint(folder)  # the converter reads every rank's files
                _convert_to_universal(folder)
            except CheckpointError as e:
                error = e
        _barrier()
        if error is not None:
            raise error
        verify_checkpoint(folder / UNIVERSAL)
        path, client_state = engine.load_checkpoint(str(folder), tag=UNIVERSAL)
    if path is None:
        raise CheckpointError(f"{folder}: DeepSpeed could not load it")
    return client_state
