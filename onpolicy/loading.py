"""Loading models for the sampler: the HF folders training exports (model + tokenizer side by side),
and outside causal LMs (`onpolicy.hf_causal`), behind one `load_model`."""

from __future__ import annotations

from pathlib import Path

from onpolicy.errors import CheckpointError


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a model folder, or a run folder holding final/."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not (path / "config.json").exists() and (path / "final" / "config.json").exists():
        path = path / "final"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    return path


def load_pretrained(path: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer) from an exported folder; a corrupt folder raises CheckpointError."""
    from onpolicy.model import DiffusionTransformer
    from onpolicy.tokenizer import load_tokenizer

    folder = resolve_model_dir(path)
    try:
        model = DiffusionTransformer.from_pretrained(str(folder))
    except Exception as e:  # truncated safetensors, missing tensors, shape mismatches
        raise CheckpointError(f"{folder}: cannot load weights ({type(e).__name__}: {e})") from e
    return model.to(device).eval(), load_tokenizer(folder)


def load_model(spec: str | Path, device: str = "cpu"):
    """(model, tokenizer) for the sampler: our exported folder (or run folder), or an outside causal LM
    ("smollm2", a .gguf file, or an HF Llama-family folder) wrapped by `onpolicy.hf_causal`."""
    import json

    from onpolicy.hf_causal import SMOLLM2, load_causal_lm
    from onpolicy.model import DiffusionTransformerConfig

    if str(spec) == SMOLLM2 or str(spec).endswith(".gguf"):
        return load_causal_lm(spec, device)
    folder = resolve_model_dir(spec)
    if json.loads((folder / "config.json").read_text()).get("model_type") != DiffusionTransformerConfig.model_type:
        return load_causal_lm(folder, device)  # an HF causal-LM folder
    return load_pretrained(folder, device)
