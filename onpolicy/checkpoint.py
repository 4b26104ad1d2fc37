"""Resumable checkpoints: DeepSpeed's own format (sharded optimizer state included), plus a manifest
of SHA-256 digests written last. No manifest = incomplete (skipped on resume); a digest mismatch =
corrupt (reported by file name, nothing loaded). The one home of `CheckpointError`."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from onpolicy.errors import CheckpointError

MANIFEST = "MANIFEST.json"
__all__ = ["CheckpointError", "MANIFEST", "save_checkpoint", "complete_checkpoints", "latest_checkpoint", "verify_checkpoint",
           "load_checkpoint"]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int, is_main: bool) -> Path:
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    _barrier()
    if is_main:
        folder = ckpt_dir / tag
        files = {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}
        tmp = folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
        tmp.replace(folder / MANIFEST)
        done = complete_checkpoints(ckpt_dir)
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return ckpt_dir / tag


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints whose save finished (they have a manifest), oldest first."""
    return sorted(p for p in ckpt_dir.glob("step_*") if (p / MANIFEST).exists())


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (an interrupted save has no manifest and is skipped)."""
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def verify_checkpoint(folder: Path) -> dict:
    """Check every file against the manifest before anything is loaded."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise CheckpointError(f"{folder}: no {MANIFEST}; the save did not finish")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{folder}: missing file {name}")
        if _digest(path) != digest:
            raise CheckpointError(f"{folder}: {name} is corrupt (SHA-256 differs from {MANIFEST})")
    return manifest


def load_checkpoint(engine, folder: Path) -> dict:
    verify_checkpoint(folder)
    path, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if path is None:
        raise CheckpointError(f"{folder}: DeepSpeed could not load it")
    return client_state


