"""Finding and loading models, behind one `load_model` for the sampler and one `load_pretrained` for
training. A model is named by any of:

- a folder written by onpolicy (or a run folder: its final/ is used);
- a LoRA adapter folder in PEFT's format (`adapter_config.json`): its base is found from that file,
  loaded, and the adapters merged in;
- an outside causal LM: an HF Llama / Mistral / Qwen2 folder, a .gguf file, or `smollm2`;
- a Hugging Face Hub id (`org/name`), fetched into (or found in) the Hub cache; offline
  (`HF_HUB_OFFLINE=1`) only the cache is read.
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
        raise FileNotFoundError(f"{repo_id}: not a local folder, and the Hub could not provide it ({type(e).__name__}: {e})") from None


def resolve_model_dir(path: str | Path) -> Path:
    """A model (or adapter) folder for a folder, a run folder holding final/, or a Hub id."""
    path = Path(path)
    if not path.exists():
        hub = _from_hub(str(path))
        if hub is None:
            raise FileNotFoundError(f"checkpoint not found: {path}")
        path = hub
    if not (path / "config.json").exists() and not (path / ADAPTER_CONFIG).exists() and (path / "final" / "config.json").exists():
        path = path / "final"
    if not (path / "config.json").exists() and not (path / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    return path


def is_ours(folder: Path) -> bool:
    from onpolicy.model import DiffusionTransformerConfig

    return json.loads((folder / "config.json").read_text()).get("model_type") == DiffusionTransformerConfig.model_type


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder names (`base_model_name_or_path`), resolved next to it when relative."""
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    if not base:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path")
    return str(folder / base) if not Path(base).is_absolute() and (folder / base).exists() else base


def load_pretrained(path: str | Path, device: str = "cpu", merge_adapter: bool = True):
    """(DiffusionTransformer in eval mode, tokenizer) from any model spec (module docstring). An
    outside causal LM is converted weight for weight (`onpolicy.convert`, causal mode); an adapter
    folder gives its base with the adapters merged (or, merge_adapter=False, a PeftModel). A corrupt
    folder raises CheckpointError."""
    from onpolicy.hf_causal import is_gguf
    from onpolicy.model import DiffusionTransformer
    from onpolicy.tokenizer import load_tokenizer

    if is_gguf(path):
        from onpolicy.convert import load_causal

        model, tokenizer = load_causal(path)
        return model.to(device).eval(), tokenizer
    folder = resolve_model_dir(path)
    if (folder / ADAPTER_CONFIG).exists():
        return _load_adapter(folder, device, merge_adapter)
    if not is_ours(folder):
        from onpolicy.convert import load_causal

        model, tokenizer = load_causal(folder)
        return model.to(device).eval(), tokenizer
    try:
        model = DiffusionTransformer.from_pretrained(str(folder))
    except Exception as e:  # truncated safetensors, missing tensors, shape mismatches
        raise CheckpointError(f"{folder}: cannot load weights ({type(e).__name__}: {e})") from e
    return model.to(device).eval(), load_tokenizer(folder)


def _load_adapter(folder: Path, device: str, merge: bool):
    from peft import PeftModel

    from onpolicy.tokenizer import has_tokenizer, load_tokenizer

    base, tokenizer = load_pretrained(adapter_base(folder), device)
    if has_tokenizer(folder):
        tokenizer = load_tokenizer(folder)
    try:
        model = PeftModel.from_pretrained(base, str(folder))
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot load the adapter onto {adapter_base(folder)} ({type(e).__name__}: {e})") from e
    model = model.merge_and_unload() if merge else model
    return model.to(device).eval(), tokenizer


def load_model(spec: str | Path, device: str = "cpu"):
    """(model, tokenizer) for the sampler: ours (folder, run folder or adapter, merged), or an outside
    causal LM ("smollm2", a .gguf file, an HF Llama-family folder or Hub id) decoded through
    `onpolicy.hf_causal` with its own transformers implementation."""
    from onpolicy.hf_causal import is_gguf, load_causal_lm

    if is_gguf(spec):
        return load_causal_lm(spec, device)
    folder = resolve_model_dir(spec)
    if not (folder / ADAPTER_CONFIG).exists() and not is_ours(folder):
        return load_causal_lm(folder, device)
    return load_pretrained(folder, device)


def load_model_tokenizer(spec: str | Path):
    """The tokenizer a model spec brings (with our special tokens), without loading its weights."""
    from onpolicy.hf_causal import gguf_source, is_gguf
    from onpolicy.tokenizer import has_tokenizer, load_tokenizer

    if is_gguf(spec):
        folder, gguf = gguf_source(spec)
        return load_tokenizer(folder, gguf_file=gguf)
    folder = resolve_model_dir(spec)
    if (folder / ADAPTER_CONFIG).exists() and not has_tokenizer(folder):
        return load_model_tokenizer(adapter_base(folder))
    return load_tokenizer(folder)
