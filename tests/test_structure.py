"""The house rules of docs/architecture.md, held by a test: who may import whom.

Every import in a module counts, function-level ones included (an import deferred into a function is
still a dependency)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def imports_of(path: Path, package: str) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved against `package`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            # `from onpolicy import engine` imports onpolicy.engine
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def violations(root: Path) -> list[str]:
    """Each broken rule as 'module imports name: rule'."""
    out = []
    trainers = {module_name(p, root) for p in (root / "onpolicy" / "trainers").glob("*.py")} - {
        "onpolicy.trainers", "onpolicy.trainers.common"}
    for path in sorted([*root.glob("onpolicy/**/*.py"), *root.glob("verifiers/**/*.py")]):
        mod = module_name(path, root)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for name in sorted(imports_of(path, package)):
            top = name.split(".")[0]
            rule = None
            if (mod.startswith("onpolicy.diffusion") and top not in STDLIB | {"torch"}
                    and not name.startswith("onpolicy.diffusion")):
                rule = "the math (onpolicy.diffusion) imports torch only"
            elif mod.startswith("verifiers") and top == "onpolicy":
                rule = "verifiers import nothing from onpolicy"
            elif mod in ("onpolicy.sampling", "onpolicy.rollout") and name.startswith("onpolicy.trainers"):
                rule = "the sampler and the rollout path never import trainers"
            elif mod in trainers and any(name == t or name.startswith(t + ".") for t in trainers - {mod}):
                rule = "no trainer imports another trainer"
            elif mod == "onpolicy.model" and (top in ("deepspeed", "omegaconf")
                                              or name.startswith(("onpolicy.engine", "onpolicy.config",
                                                                                              "onpolicy.trainers"))):
                rule = "the model knows nothing of training, config or DeepSpeed"
            elif mod.startswith("onpolicy.data") and (name.startswith(("onpolicy.model", "onpolicy.trainers",
                                                                       "onpolicy.sampling"))
                                                      or top == "deepspeed"):
                rule = "data knows no model"
            if rule and not any(o.startswith(f"{mod} imports ") and o.endswith(rule) for o in out):
                out.append(f"{mod} imports {name}: {rule}")  # once per module and rule
    return out


def test_the_import_rules_hold():
    assert violations(ROOT) == []


def test_the_import_rule_check_catches_a_forbidden_import(tmp_path):
    """Copy the tree, add one forbidden import per rule, and see each reported."""
    import shutil

    for pkg in ("onpolicy", "verifiers"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copytree(ROOT / "onpolicy" / "data", tmp_path / "onpolicy" / "data",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "onpolicy" / "trainers" / "other.py").write_text("def train(cfg):\n    pass\n")
    planted = {
        "onpolicy/diffusion/losses.py": "from onpolicy.config import TrainConfig\n",
        "verifiers/base.py": "import onpolicy.sampling\n",
        "onpolicy/rollout.py": "def f():\n    from onpolicy.trainers.pretrain import train\n",
        "onpolicy/trainers/pretrain.py": "from onpolicy.trainers import other\n",
        "onpolicy/model.py": "import deepspeed\n",
        "onpolicy/data/generated.py": "from ..model import DiffusionTransformer\n",
    }
    for rel, line in planted.items():
        path = tmp_path / rel
        path.write_text(path.read_text() + "\n" + line)
    found = violations(tmp_path)
    assert len(found) == len(planted), found
    for expected in ("onpolicy.diffusion.losses imports onpolicy.config",
                     "verifiers.base imports onpolicy.sampling",
                     "onpolicy.rollout imports onpolicy.trainers.pretrain",
                     "onpolicy.trainers.pretrain imports onpolicy.trainers.other",
                     "onpolicy.model imports deepspeed", "onpolicy.data.generated imports onpolicy.model"):
        assert any(f.startswith(expected) for f in found), (expected, found)


def test_light_entry_points_do_not_load_torch():
    """Generated tasks and `onpolicy verify` work where torch is not even installed."""
    for code in ("import sys; sys.modules['torch'] = None; import onpolicy.data.generated, "
                 "onpolicy.data.tasks",
                 "import sys; sys.modules['torch'] = None; from onpolicy.cli import main; main(['verify', "
                 "'--help'])"):
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]


def test_exported_model_code_is_self_contained():
    """The files an exported folder carries (onpolicy.export.CODE_FILES) import only the standard
    library, torch, transformers and each other, relatively: the folder loads where onpolicy is not
    installed (tests/test_export.py shows it end to end)."""
    from onpolicy.export import CODE_FILES

    shipped = {Path(src).stem for src in CODE_FILES.values()}
    for src in CODE_FILES.values():
        path = ROOT / "onpolicy" / src
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert (node.module
                        or "").split(".")[0] in shipped, f"{src}: from .{node.module} is not shipped"
                continue
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] in STDLIB | {"torch", "transformers"}, f"{src} imports {name}"


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles among the project's modules, counting imports inside functions (a deferred import that
    closes a circle still makes two modules depend on each other). A package's __init__ re-exporting its
    modules is not an edge back from them."""
    modules = {}
    for top in ("onpolicy", "verifiers"):
        for path in (root / top).rglob("*.py"):
            modules[module_name(path, root)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = {m for m in imports_of(path, package) if m in modules and m != name}
        graph[name] = {t for t in targets if not name.startswith(t + ".")
                       and not modules[t].name == "__init__.py"}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_circles_counting_imports_inside_functions():
    assert import_cycles(ROOT) == []


def test_the_circle_check_finds_a_planted_circle(tmp_path):
    pkg = tmp_path / "onpolicy"
    pkg.mkdir()
    (tmp_path / "verifiers").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from onpolicy import b\n")
    (pkg / "b.py").write_text("def f():\n    from onpolicy.a import g\n")
    assert import_cycles(tmp_path) == [["onpolicy.a", "onpolicy.b", "onpolicy.a"]]


@pytest.mark.slow
def test_stage4_uses_every_config_key_it_accepts(tmp_path, init_model):
    """A toy stage-4 run with every optional part on (LoRA, KL, the anchor, both surrogates, failed rows,
    sampled states, the buffer, dynamic sampling, validation, wandb offline) reads every key the stage
    accepts; the keys it does not use are refused when set (config.OnPolicyConfig.UNUSED)."""
    import dataclasses
    import json

    from onpolicy.config import OnPolicyConfig
    from onpolicy.sampling import SamplerConfig

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                yield from leaves(type(default), f"{prefix}{f.name}.")
            elif f.name != "stage":
                yield f"{prefix}{f.name}", f"{cls.__name__}.{f.name}"

    accepted = {key: field for key, field in leaves(OnPolicyConfig) if key not in OnPolicyConfig.UNUSED}
    assert SamplerConfig.__name__ in {f.split(".")[0] for f in accepted.values()}
    reads = tmp_path / "reads.json"
    run = subprocess.run(
        [sys.executable, "-m", "tests.config_reads", str(reads), "train", "recipes/tiny/stage4_onpolicy.yaml",
         f"model.init_from={init_model}", f"logging.output_dir={tmp_path / 'run'}", "logging.progress=false",
         "logging.wandb=offline", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.n_tasks=8",
         "rollout.batch_size=4", "rollout.sampler.max_new_tokens=8", "rollout.dynamic_sampling=1",
         "rollout.verifier=tests.plugins:CoinVerifier", "validation.n_tasks=2", "validation.every=1",
         "validation.patience=5", "train.max_steps=2", "train.micro_batch_size=2", "train.save_every=1",
         "train.warmup_steps=1", "lora.r=2", "loss.beta=0.1", "loss.surrogate=both", "loss.anchor=1",
         "loss.distill_failed=1", "loss.distill_rows=2", "loss.buffer_size=8", "loss.buffer_rows=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "WANDB_SILENT": "true"})
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    read = set(json.loads(reads.read_text()))
    unread = sorted(key for key, field in accepted.items() if field not in read)
    assert unread == [], unread
