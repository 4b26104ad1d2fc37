import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed JIT-compiles its CPU comm op (~40 s) into TORCH_EXTENSIONS_DIR: one folder for the whole
# suite (and later runs), not one per test's cache folder. Subprocesses inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "onpolicy" / "torch_extensions"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def special():
    from onpolicy.tokenizer import SpecialTokens

    return SpecialTokens(pad=0, bos=1, eos=2, mask=3, sep=4, vocab_size=64)


@pytest.fixture
def make_model(special):
    from onpolicy.model import DiffusionTransformer, DiffusionTransformerConfig

    def make(attention="block_causal", block_size=4, seed=0, **kw):
        torch.manual_seed(seed)
        cfg = DiffusionTransformerConfig(
            vocab_size=special.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            attention=attention, block_size=block_size, mask_token_id=special.mask, **kw,
        )
        return DiffusionTransformer(cfg).eval()

    return make


STDLIB_SAMPLE = ["textwrap.py", "bisect.py", "heapq.py", "colorsys.py", "keyword.py", "fnmatch.py",
                 "shlex.py", "calendar.py", "string.py", "numbers.py", "abc.py", "copy.py", "glob.py",
                 "sched.py"]


def _copy_sample(out: Path) -> Path:
    from onpolicy.data.corpus import stdlib_root

    out.mkdir()
    for name in STDLIB_SAMPLE:
        (out / name).write_text((stdlib_root() / name).read_text())
    return out


@pytest.fixture
def code_dir(tmp_path):
    """A small folder of real Python files (from the standard library) as a corpus (a test may change it)."""
    return _copy_sample(tmp_path / "code")


@pytest.fixture(scope="session")
def shared_corpus(tmp_path_factory):
    """(code folder, cache folder) shared by the whole session: the tokenizer and the packed corpus are
    built once (the cache is keyed by documents, tokenizer and packing) and read by every training test."""
    root = tmp_path_factory.mktemp("shared")
    return _copy_sample(root / "code"), root / "cache"


def run_cli(*args: str, env: dict | None = None, timeout: int = 600):
    """Run `python -m onpolicy.cli ...` in a subprocess (each training run gets a fresh process group)."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "onpolicy.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def init_model(tmp_path_factory):
    """A random block-4 diffusion model with a tokenizer trained on generated tasks (where stages 3 and
    4 start, at toy size)."""
    from onpolicy.data.generated import generate_tasks
    from onpolicy.model import DiffusionTransformer, DiffusionTransformerConfig
    from onpolicy.tokenizer import SpecialTokens, train_tokenizer

    folder = tmp_path_factory.mktemp("init")
    tasks = generate_tasks("train", 200)
    tok = train_tokenizer([t.prompt + t.canonical_solution for t in tasks], vocab_size=400)
    special = SpecialTokens.from_tokenizer(tok)
    torch.manual_seed(0)
    DiffusionTransformer(DiffusionTransformerConfig(
        vocab_size=special.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        attention="block_causal", block_size=4, mask_token_id=special.mask,
        shift_logits=True)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
