"""Model folders that load anywhere, as Dream, LLaDA and DiffuCoder ship theirs.

An exported folder holds the weights (safetensors), the tokenizer, and the model's own code: the
modeling file (`modeling_onpolicy.py`, a copy of onpolicy/model.py) with the files it imports
relatively (the sampler and the special tokens), named in config.json's `auto_map`. So

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    ids = model.diffusion_generate(tokenizer(prompt, return_tensors="pt").input_ids)

works in a Python that has never installed onpolicy. The config carries the recommended decoding
(`decoding`: block size, threshold, ...), the defaults of `diffusion_generate`, and the folder has a
model card (`README.md`) with Hub metadata, the recipe and evaluation numbers when known.

`onpolicy export RUN [--step N] [--out DIR] [--llama]` makes such a folder from any run: its final
model, or the resumable checkpoint of step N (ZeRO shards gathered, LoRA adapters merged). With
`--llama` a causal (AR) model is written as a plain transformers `LlamaForCausalLM` instead.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parent
# file in the exported folder -> its source in this package (model.py imports the others relatively)
CODE_FILES = {"modeling_onpolicy.py": "model.py", "sampling.py": "sampling.py",
              "special_tokens.py": "special_tokens.py", "errors.py": "errors.py"}
AUTO_MAP = {
    "AutoConfig": "modeling_onpolicy.DiffusionTransformerConfig",
    "AutoModel": "modeling_onpolicy.DiffusionTransformer",
    "AutoModelForMaskedLM": "modeling_onpolicy.DiffusionTransformer",
}
SKELETON = "model"  # <run>/model/: the run's model config and tokenizer, written at its start (export --step)


def save_model_folder(model, tokenizer, out_dir: Path, decoding: dict | None = None,
                      card: dict | None = None) -> Path:
    """Write `model` (a DiffusionTransformer, on any device) as a self-contained folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a decoding block inherited from the parent model's config is not this model's: the block it was trained
    # (or moved) to is; only an explicit `decoding` may recommend another
    inherited = {k: v for k, v in (getattr(model.config, "decoding", None) or {}).items()
                 if k != "block_size"}
    model.config.decoding = {"max_new_tokens": 128, "temperature": 0.0, **inherited,
                             "block_size": model.config.block_size, **(decoding or {})}
    # our diffusion model: the sampler needs these ids
    if getattr(model.config, "mask_token_id", None) is not None:
        from onpolicy.special_tokens import SpecialTokens

        special = SpecialTokens.from_tokenizer(tokenizer)
        for name in ("pad", "bos", "eos"):
            if getattr(model.config, f"{name}_token_id", None) is None:
                setattr(model.config, f"{name}_token_id", getattr(special, name))
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    model.save_pretrained(str(out_dir), state_dict=state)
    tokenizer.save_pretrained(str(out_dir))
    add_model_code(out_dir)
    write_model_card(out_dir, model, card or {})
    return out_dir


def add_model_code(folder: Path) -> None:
    """Copy the modeling code into `folder` and point config.json's auto_map at it."""
    for name, source in CODE_FILES.items():
        shutil.copyfile(PACKAGE / source, folder / name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = AUTO_MAP
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


HUB_ID = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"
PATH_KEYS = ("source", "init_from", "output_dir", "cache_dir", "path", "deepspeed", "tasks", "resume")


def public_base(spec: str | None) -> tuple[str | None, str | None]:
    """(the Hub id for the card's `base_model`, a name for people) of what a model started from: a Hub id
    stays; a local folder gives no Hub id and only its name (never a path of this machine)."""
    import re

    if not spec:
        return None, None
    if re.match(HUB_ID, str(spec)) and not Path(spec).exists():
        return str(spec), str(spec)
    p = Path(spec)
    name = f"{p.parent.name}/{p.name}" if p.name in ("final", "best") else p.name
    return None, name


def public_recipe(recipe_yaml: str, model) -> str:
    """The run's config for the card: paths reduced to their last names, the model section the real shape."""
    import yaml

    data = yaml.safe_load(recipe_yaml) or {}

    def scrub(node):
        if isinstance(node, dict):
            return {k: (_name(v) if k in PATH_KEYS and isinstance(v, str) else scrub(v)) for k,
                    v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    data = scrub(data)
    c = model.config
    model_section = data.setdefault("model", {})
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "attention", "block_size",
                "shift_logits"):
        if hasattr(c, key):
            model_section[key] = getattr(c, key)
    return yaml.safe_dump(data, sort_keys=False)


def _name(value: str) -> str:
    return (Path(value).name if ("/" in value or "\\" in value)
            and not value.startswith(("generated:", "repair:")) else value)


def write_model_card(folder: Path, model, card: dict) -> None:
    """README.md with Hub metadata (library, tags, base model as a Hub id, license), a usage snippet that
    runs as written, the recipe (paths reduced to names) and eval numbers. No path of this machine."""
    c = model.config
    causal = c.attention == "causal"
    n_params = sum(p.numel() for p in model.parameters())
    hub_base, base_name = public_base(card.get("base_model"))
    tags = ["onpolicy", "code"] + (["causal-lm"] if causal else ["diffusion", "block-diffusion", "dllm"])
    # no pipeline_tag: transformers' pipeline() cannot drive a diffusion sampler; the
    # snippet below is the way in
    meta = ["---", "library_name: transformers", "license: apache-2.0", "tags:", *[f"- {t}" for t in tags]]
    if hub_base:
        meta.append(f"base_model: {hub_base}")
    meta.append("---")
    kind = "causal (autoregressive) transformer" if causal else (f"{c.attention} diffusion transformer, "
                                                                 "block "
                                                                 f"size {c.block_size}")
    adapters = card.get("adapter_params")
    repo = card.get("repo") or "path/to/this/folder"
    shape = (f"{c.num_hidden_layers} layers, hidden size {c.hidden_size}, {c.num_attention_heads} heads, "
             f"vocabulary {c.vocab_size:,}")
    lines = [*meta, "", f"# {card.get('name', folder.name)}", "",
             f"A {n_params / 1e6:.2f}M-parameter {kind} ({shape}), trained with onpolicy"
             + (f" (stage `{card['stage']}`)" if card.get("stage") else "")
             + (f", starting from `{base_name}`" if base_name else "")
             + (f"; LoRA adapters ({adapters:,} parameters) merged in" if adapters else "") + ".", "",
             "## Use", "", "```python", "from transformers import AutoModel, AutoTokenizer", "",
             f'model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)',
             f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
             'ids = tokenizer("def add(a, b):\\n", return_tensors="pt").input_ids',
             "out = model.generate(ids, max_new_tokens=32)  # the block-diffusion sampler; defaults: "
             "config.json's `decoding`",
             "print(tokenizer.decode(out[0]))", "```", "",
             f"Recommended decoding (saved in config.json): `{json.dumps(c.decoding)}`.", ""]
    if card.get("eval"):
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k,
                    v in card["eval"].items()], ""]
    if card.get("recipe"):
        lines += ["## Recipe", "", "```yaml", public_recipe(card["recipe"], model).rstrip(), "```", ""]
    (folder / "README.md").write_text("\n".join(lines))


def machine_paths(folder: Path) -> list[str]:
    """Files of `folder` that name a path of this machine (an absolute path of it, or the home folder)."""
    import tempfile

    marks = {str(Path.home()) + "/", str(Path.cwd()) + "/", tempfile.gettempdir() + "/",
             str(folder.resolve().parent) + "/"}
    found = []
    for f in sorted(folder.rglob("*")):  # the tokenizer's vocabulary may hold any text: not a path it names
        if (f.is_file() and f.suffix in (".json", ".md", ".yaml", ".txt", ".py")
                and f.name not in ("tokenizer.json", "vocab.json")):
            text = f.read_text(errors="ignore")
            if any(m in text for m in marks if len(m) > 2):
                found.append(str(f.relative_to(folder)))
    return found


def push_folder(folder: Path, repo_id: str, private: bool = False,
                message: str = "Upload model from onpolicy", api=None) -> str:
    """Upload an exported folder to the Hub repository `repo_id` (created if missing); its URL. Refuses a
    folder that is not a model folder or that names paths of this machine. `api`: a stand-in for tests."""
    from onpolicy.errors import ConfigError

    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"{folder}: not a model folder (no config.json); export one with `onpolicy export "
                          "RUN`")
    leaks = machine_paths(folder)
    if leaks:
        raise ConfigError(f"{folder}: {leaks[0]} names a path of this machine; re-export with this version "
                          "of onpolicy")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
    return f"https://huggingface.co/{repo_id}"


def save_skeleton(out: Path, model, tokenizer, is_main: bool) -> None:
    """<run>/model/: the model's config and tokenizer (no weights), so any checkpoint of the run can
    be exported later (`onpolicy export RUN --step N`)."""
    if not is_main:
        return
    folder = Path(out) / SKELETON
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(folder / "config.json"))
    tokenizer.save_pretrained(str(folder))


def checkpoint_state(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a resumable checkpoint folder (checked against its manifest first):
    ZeRO shards gathered by DeepSpeed's zero_to_fp32, or the module states of a ZeRO-0 run."""
    from onpolicy.checkpoint import verify_checkpoint

    verify_checkpoint(folder)
    if any(folder.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def refuse_existing(target: Path, command: str) -> None:
    """`export` and `merge` never write over a folder that holds something (a model would be half
    replaced)."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not empty; {command} will not overwrite it (give "
                              "another --out)")


def model_at_step(run: Path, step: int):
    """(DiffusionTransformer, tokenizer) of a run's checkpoint at `step` (LoRA merged)."""
    from onpolicy.config import load_config
    from onpolicy.errors import CheckpointError
    from onpolicy.loading import load_model_tokenizer
    from onpolicy.model import DiffusionTransformer, DiffusionTransformerConfig

    skeleton, folder = run / SKELETON, run / "checkpoints" / f"step_{step:08d}"
    if not (skeleton / "config.json").is_file():
        raise FileNotFoundError(f"{run}: no {SKELETON}/config.json (runs write it at their start)")
    if not folder.is_dir():
        done = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
        raise FileNotFoundError(f"{folder}: no such checkpoint; the run has: {', '.join(done) or 'none'}")
    model = DiffusionTransformer(DiffusionTransformerConfig.from_json_file(str(skeleton / "config.json")))
    state = checkpoint_state(folder)
    # trained with LoRA: rebuild the adapters, merge
    if any(k.startswith("base_model.model.") for k in state):
        from onpolicy.lora import apply_lora

        model = apply_lora(model, load_config(run / "config.yaml").lora)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit the run's model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval(), load_model_tokenizer(skeleton)


def export_run(run: str, out: str | None, step: int | None, llama: bool,
               base_model: str | None = None) -> Path:
    """`onpolicy export`: a run (or model folder) as a self-contained folder; its path."""
    from onpolicy.loading import load_pretrained

    run_dir = Path(run)
    name = f"step_{step:08d}" if step is not None else "final"
    target = Path(out) if out else run_dir / ("export-llama" if llama else "export") / name
    refuse_existing(target, "export")
    if step is not None:
        model, tokenizer = model_at_step(run_dir, step)
    else:
        model, tokenizer = load_pretrained(run_dir)
    if llama:
        from onpolicy.convert import to_llama

        llama_model = to_llama(model)  # refuses a diffusion model before any folder exists
        target.mkdir(parents=True, exist_ok=True)
        llama_model.save_pretrained(str(target))
        tokenizer.save_pretrained(str(target))
        return target
    card = {"name": run_dir.name, "stage": None, "eval": None, "base_model": base_model}
    recipe = run_dir / "config.yaml"
    if recipe.is_file():
        card["recipe"] = recipe.read_text()
        if base_model is None:
            import yaml

            card["base_model"] = ((yaml.safe_load(card["recipe"]) or {}).get("model") or {}).get("init_from")
    adapter = run_dir / "final-adapter" / "adapter_model.safetensors"
    if adapter.is_file():  # a LoRA run: its adapters, counted apart from the merged model's parameters
        from safetensors import safe_open

        with safe_open(str(adapter), "pt") as f:
            card["adapter_params"] = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    summary = run_dir / "summary.json"
    if summary.is_file() and step is None:
        s = json.loads(summary.read_text())
        card["eval"] = {k: v for k, v in s.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return save_model_folder(model, tokenizer, target, card=card)
