"""The docs are part of the product: short README, links and file references that resolve, no pointers
to design documents outside the repository, and the verifier guide's example run exactly as written."""

import json
import re
import shutil
import subprocess

import pytest

from .conftest import ROOT, run_cli

PATH_REF = re.compile(r"(?<![\w/.-])((?:onpolicy|verifiers|recipes|benchmarks|tests|docs|scripts)/[\w./-]*\w"
                      r"\.(?:py|md|yaml|json|png|sh|toml|txt|html|jsonl))")
LINK = re.compile(r"\]\(([^)\s]+)\)")
OUTSIDE_DOCS = ("PAPER" + ".md", "ARCHITECTURE" + ".md", "ENVIRONMENT" + ".md", "STYLE" + ".md")


def tracked(*suffixes: str) -> list:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    return [ROOT / f for f in files if f.endswith(suffixes) and (ROOT / f).is_file()]


def test_readme_is_short_and_gives_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "scripts/run.sh" in readme and "scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    for page in ("method", "architecture", "recipes", "verifiers", "lora", "scaling", "export", "evaluation",
                 "troubleshooting", "experiments"):
        assert f"](docs/{page}.md)" in readme, page  # every job one click away


def test_every_markdown_link_and_file_reference_resolves():
    missing = []
    for md in tracked(".md"):
        text = md.read_text()
        missing += [f"{md.relative_to(ROOT)}: cites {name}, not in the repository" for name in OUTSIDE_DOCS
                    if name in text]
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = (md.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{md.relative_to(ROOT)}: link {target}")
        for ref in PATH_REF.findall(text):
            if not (ROOT / ref).exists():
                missing.append(f"{md.relative_to(ROOT)}: {ref}")
    assert not missing, "\n".join(missing)


def test_code_comments_cite_files_that_exist_and_no_outside_design_documents():
    missing = []
    for f in tracked(".py", ".yaml", ".sh", ".toml"):
        if f.name == "test_docs.py":
            continue
        text = f.read_text()
        missing += [f"{f.relative_to(ROOT)}: {name}" for name in OUTSIDE_DOCS if name in text]
        for ref in PATH_REF.findall(text):
            if ref.startswith("benchmarks/results/"):
                continue  # outputs a command writes
            if not (ROOT / ref).exists():
                missing.append(f"{f.relative_to(ROOT)}: {ref}")
    assert not missing, "\n".join(missing)


def _guide_example() -> str:
    text = (ROOT / "docs" / "verifiers.md").read_text()
    return re.search(r"```python\n(# my_checks\.py.*?)```", text, re.S).group(1)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_the_verifier_guide_example_runs_as_written(tmp_path, init_model):
    (tmp_path / "my_checks.py").write_text(_guide_example())
    env = {"PYTHONPATH": str(tmp_path)}
    # verify: a generated task set, the plugin with an argument; a reference passes, a wrong body fails
    from onpolicy.data.tasks import load_task_set

    tasks = load_task_set("generated:validation", 3)
    rows = [{"task_id": tasks[0].task_id, "completion": tasks[0].canonical_solution},
            {"task_id": tasks[1].task_id, "completion": "    return None\n"},
            {"task_id": tasks[2].task_id, "completion": tasks[2].canonical_solution + "\n" * 3
             + "    # x\n" * 12}]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results.jsonl"
    r = run_cli("verify", "generated:validation", str(samples), "--out", str(out), "--verifier",
                "my_checks:ShortAndCorrect", "--verifier-arg", "max_lines=6", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert [v["passed"] for v in verdicts] == [True, False, True]
    assert verdicts[0]["score"] == 1.0 and 0 < verdicts[2]["score"] < 1.0  # graded: longer is worth less
    # with a pass threshold the long solution no longer counts as a pass
    r = run_cli("verify", "generated:validation", str(samples), "--out", str(out), "--verifier",
                "my_checks:ShortAndCorrect", "--verifier-arg", "max_lines=6", "--pass-threshold", "0.9",
                env=env)
    assert (r.returncode == 0
            and [json.loads(x)["passed"] for x in out.read_text().splitlines()] == [True, False, False])
    # eval with the plugin
    r = run_cli("eval", str(init_model), "--tasks", "generated:validation", "--limit", "2",
                "--max-new-tokens", "8", "--verifier", "my_checks:ShortAndCorrect", "--out",
                str(tmp_path / "eval.json"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 0 <= json.loads((tmp_path / "eval.json").read_text())["pass@1"] <= 1
    r = run_cli("verify", "--list")
    assert r.returncode == 0 and "python-tests" in r.stdout


def test_a_plugin_without_strict_gets_a_clear_error():
    from verifiers.registry import get_verifier

    with pytest.raises(TypeError, match="strict"):
        get_verifier("tests.plugins:CoinVerifier", strict=True)
