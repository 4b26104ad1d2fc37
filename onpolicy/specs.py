"""Model specs: which folder a name means (a model folder, a run folder's final/, an adapter folder, a
Hub id) and what an adapter folder says about its base. A leaf module: `loading`, `convert`, `hf_causal`,
`export` and the trainers all resolve names here, so none of them needs another to do it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from onpolicy.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _from_hub(repo_id: str) -> Path | None:
    """The local snapshot of a Hub model id, downloaded if needed (None when it is not a Hub id)."""
    if not _HUB_ID.match(repo_id):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id))
    except HFValidationError:
        return None
    except Exception as e:  # offline and not cached, unknown repo, no network
        raise FileNotFoundError(f"{repo_id}: not a local folder, and the Hub could not provide it "
                                f"({type(e).__name__}: {e})") from None


def resolve_model_dir(path: str | Path) -> Path:
    """A model (or adapter) folder for a folder, a run folder holding final/, or a Hub id."""
    path = Path(path)
    if not path.exists():
        hub = _from_hub(str(path))
        if hub is None:
            raise FileNotFoundError(f"checkpoint not found: {path}")
        path = hub
    if (not (path / "config.json").exists() and not (path / ADAPTER_CONFIG).exists()
            and (path / "final" / "config.json").exists()):
        path = path / "final"
    if not (path / "config.json").exists() and not (path / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    return path


def is_ours(folder: Path) -> bool:
    from onpolicy.model import DiffusionTransformerConfig

    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    return model_type == DiffusionTransformerConfig.model_type


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder names (`base_model_name_or_path`), resolved next to it when
    relative."""
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    if not base:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path")
    return str(folder / base) if not Path(base).is_absolute() and (folder / base).exists() else base
