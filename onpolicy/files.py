"""Publishing a folder atomically, safe for many processes on many machines at once; file digests.

Caches (tokenizers, corpus shards) may be built by one process per node on node-local disks, or by
several processes sharing one filesystem. Each builder writes into a temporary folder whose name
no other process can pick (host, pid, random), then renames it into place: a reader sees a whole
folder or none, and when two builders race, the first complete copy wins.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (checkpoint shards do not fit in memory twice)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def temporary_sibling(folder: Path) -> Path:
    """A fresh, empty folder beside `folder`, named so that no other process collides with it."""
    tmp = folder.parent / f".{folder.name}.{os.uname().nodename}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, folder: Path, is_complete: Callable[[Path], bool]) -> None:
    """Move `tmp` to `folder`. If `folder` exists already: keep it when `is_complete(folder)` (another
    builder won the race), else replace it (a damaged copy)."""
    try:
        tmp.rename(folder)
        return
    except OSError:
        pass
    if is_complete(folder):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    stale = tmp.with_name(tmp.name + ".old")
    folder.rename(stale)
    shutil.rmtree(stale, ignore_errors=True)
    tmp.rename(folder)
