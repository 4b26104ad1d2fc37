"""The recipes and DeepSpeed configs that ship with onpolicy (package data), found from anywhere.

In a source checkout they are the repository's `recipes/` folder; in an installed package the same
files sit in `onpolicy/recipe_files/` (pyproject.toml maps one onto the other). A recipe path that is not a
file where the user stands is looked up there, with or without the leading `recipes/`, so
`onpolicy train recipes/tiny/stage1_mask.yaml` and the default `train.deepspeed` work from any folder.

    onpolicy recipes                         # list them, each with its command line
    onpolicy recipes cp tiny/stage1_mask .   # copy one out to edit
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
SUFFIXES = (".yaml", ".json")


def recipes_root() -> Path:
    """The folder holding the shipped recipes (source checkout or installed package)."""
    for folder in (PACKAGE.parent / "recipes", PACKAGE / "recipe_files"):
        if (folder / "deepspeed").is_dir():
            return folder
    raise FileNotFoundError(f"onpolicy's recipes are missing (looked in {PACKAGE.parent / 'recipes'} and "
                            f"{PACKAGE / 'recipe_files'})")


def find_recipe(path: str | Path) -> Path:
    """`path` itself when it is a file, else the shipped file of that name ("recipes/tiny/stage1_mask.yaml",
    "tiny/stage1_mask.yaml" or "tiny/stage1_mask"); FileNotFoundError naming what was tried."""
    p = Path(path)
    if p.is_file():
        return p
    rel = p.relative_to("recipes") if p.parts[:1] == ("recipes",) else p
    root = recipes_root()
    for candidate in (root / rel, *(root / rel.with_name(rel.name + s) for s in SUFFIXES)):
        if not p.is_absolute() and candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no such file here, nor among onpolicy's recipes (`onpolicy recipes` "
                            "lists them)")


def list_recipes() -> list[tuple[str, str]]:
    """(name, first comment line: usually its command) of every shipped recipe and DeepSpeed config."""
    root = recipes_root()
    out = []
    for f in sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES):
        if f.suffix == ".json":  # DeepSpeed configs: JSON has no comment line, so say what it sets
            zero = json.loads(f.read_text()).get("zero_optimization", {})
            offload = " with CPU offload" if any(k.startswith("offload") for k in zero) else ""
            note = (f"DeepSpeed config: ZeRO stage {zero.get('stage', 0)}{offload} "
                    f"(train.deepspeed=recipes/{f.relative_to(root)})")
        else:
            first = f.read_text().splitlines()[:1]
            note = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        name = f.relative_to(root)
        out.append((str(name.with_suffix("") if f.suffix == ".yaml" else name), note))
    return out


def copy_recipe(name: str, dest: str | Path) -> Path:
    """Copy a shipped recipe to `dest` (a folder or a file name); the path written."""
    source = find_recipe(name)
    target = Path(dest)
    # a folder, existing or to make
    if target.is_dir() or str(dest).endswith(("/", "\\")) or not target.suffix:
        target = target / source.name
    if target.exists():
        raise FileExistsError(f"{target} exists; not overwriting it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def main(args) -> int:
    if args.action is None:
        for name, note in list_recipes():
            print(f"{name:32s} {note}")
        return 0
    if args.action != "cp" or len(args.names) != 2:
        raise ValueError("usage: onpolicy recipes [cp NAME DEST]")
    print(f"wrote {copy_recipe(*args.names)}")
    return 0
