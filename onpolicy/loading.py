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

from pathlib import Path

from onpolicy.errors import CheckpointError
from onpolicy.specs import ADAPTER_CONFIG, adapter_base, is_ours, resolve_model_dir  # noqa: F401  (re-exported)


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
        raise CheckpointError(f"{folder}: cannot load the adapter onto {adapter_base(folder)} "
                              f"({type(e).__name__}: {e})") from e
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
