import functools
import random
import shutil

import pytest

from onpolicy.data.generated import _pairs, generate_tasks, has_heldout_pair, level_of
from onpolicy.evaluation import pass_at_k


def test_same_seed_same_tasks_other_seed_other_tasks():
    a = generate_tasks("train", 200, seed=1)
    assert a == generate_tasks("train", 200, seed=1)
    b = generate_tasks("train", 200, seed=2)
    assert [t.prompt for t in a] != [t.prompt for t in b]
    assert len({t.prompt for t in a}) == 200  # deduplicated


@functools.lru_cache(maxsize=1)
def _code_to_kind():
    """Every line the grammar can emit -> its operation kind (each line belongs to exactly one kind)."""
    from onpolicy.data import generated

    rng = random.Random(0)
    table: dict[str, str] = {}
    for _ in range(40000):  # enough draws to see every constant of every operation
        for op in (generated._list_op(rng), generated._reduction(rng)):
            assert table.setdefault(op.code, op.kind) == op.kind
    return table


def _kinds(task):
    """Operation kinds of a task, recovered from its reference solution's lines."""
    table = _code_to_kind()
    lines = [line.strip() for line in task.canonical_solution.splitlines() if line.strip() != "return xs"]
    assert all(line in table for line in lines), lines
    return [table[line] for line in lines]


def _ops(task):
    from onpolicy.data.generated import Op

    lines = [line.strip() for line in task.canonical_solution.splitlines() if line.strip() != "return xs"]
    return [Op(kind, "", code, kind in ("sum", "count", "max", "min", "first", "last")) for kind,
            code in zip(_kinds(task), lines)]


def test_simplified_form_drops_what_cannot_change_the_result():
    from onpolicy.data.generated import Op, simplified

    def op(kind, code=""):
        return Op(kind, "", code or kind, kind in ("sum", "count", "max", "min", "first", "last"))

    kinds = lambda ops: [o.kind for o in simplified(ops)]  # noqa: E731
    assert kinds([op("sort_desc"), op("sort_asc")]) == ["sort_asc"]
    assert kinds([op("sort_asc"), op("map_mul"), op("sort_asc"), op("count")]) == ["count"]
    assert kinds([op("reverse"), op("reverse"), op("take")]) == ["take"]
    assert kinds([op("filter_odd"), op("filter_gt")]) == kinds([op("filter_gt"), op("filter_odd")])
    assert kinds([op("unique"), op("filter_gt"), op("max")]) == ["filter_gt", "max"]
    assert kinds([op("reverse"), op("take")]) == ["reverse", "take"]  # order matters to take: kept


def test_splits_are_disjoint_and_heldout_is_new_compositions():
    train = generate_tasks("train", 600)
    val = generate_tasks("validation", 200)
    held = generate_tasks("heldout", 200)
    assert not {t.prompt for t in train} & {t.prompt for t in val}
    assert not {t.prompt for t in train} & {t.prompt for t in held}
    for t in train + val:
        assert not has_heldout_pair(_ops(t)), t.prompt
    for t in held:
        assert has_heldout_pair(_ops(t)), t.prompt
    assert {level_of(t) for t in train} == {1, 2, 3, 4}
    assert _pairs([]) == []


def test_no_heldout_task_computes_the_same_function_as_a_train_task():
    """Twins by behaviour: outputs on fresh inputs (not the generator's own probes) of a held-out sample
    never equal those of any of a train sample's tasks; simplified forms count as the same function."""
    import importlib.util
    from pathlib import Path

    from onpolicy.data.generated import PROBES, behaviour

    spec = importlib.util.spec_from_file_location("split_twins",
                                                  Path(__file__).parents[1] / "benchmarks" / "split_twins.py")
    twins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(twins)
    inputs = twins.fresh_inputs(88, seed=7)
    assert not set(map(tuple, inputs)) & set(PROBES)
    result = twins.count_twins(generate_tasks, n_heldout=100, n_train=4000, inputs=inputs, seed=3)
    assert result["twins"] == 0, result["twin_ids"]

    def desc_then_asc(xs):
        return sorted(sorted(xs, reverse=True))

    def count_after_sorts(xs):
        return len(sorted([x * 2 for x in sorted(xs)]))

    assert behaviour(desc_then_asc) == behaviour(sorted)  # a redundant sort is the same function
    assert behaviour(count_after_sorts) == behaviour(len)
    assert behaviour(sorted) != behaviour(len)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_every_reference_passes_and_a_wrong_one_fails():
    from verifiers import PythonTestVerifier

    tasks = generate_tasks("train", 150) + generate_tasks("validation", 50) + generate_tasks("heldout", 100)
    with PythonTestVerifier() as v:
        good = v.verify(tasks, [t.canonical_solution for t in tasks])
        assert [(g.task_id, g.detail) for g in good if not g.passed] == []
        bad = v.verify(tasks, ["    return None\n"] * len(tasks))
        assert not [b.task_id for b in bad if b.passed]


def test_pass_at_k_hand_values():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 3) == pytest.approx(1 - 1 / 4)  # 1 - C(3,3)/C(4,3)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_truncate_completion_and_task_sets():
    from onpolicy.data.tasks import load_task_set, truncate_completion

    assert truncate_completion("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate_completion("    return 1\n") == "    return 1\n"
    held = load_task_set("generated:heldout", 5)
    assert len(held) == 5 and all(t.task_id.startswith("generated/heldout/") for t in held)
    easy = load_task_set("generated:train:levels=1,2", 8)
    assert [level_of(t) for t in easy] == [1, 2] * 4
    assert [t.task_id for t in load_task_set("generated:train:levels=1,2,3,4", 8)] == [
        t.task_id for t in load_task_set("generated:train", 8)]
    for bad in ("generated:train:level=1", "generated:train:levels=5", "generated:train:levels=",
                "repair:train:levels=1:x", "generated:heldout:skip=-1", "generated:heldout:skip=1:skip=2",
                "generated:heldout:seed=x"):
        with pytest.raises(ValueError, match=r"levels=L\[,L...\]\]\[:seed=S\]\[:skip=N\]"):
            load_task_set(bad, 4)


@pytest.mark.parametrize("kind", ["generated", "repair"])
def test_seed_and_skip_give_tasks_disjoint_from_the_reported_ones(kind):
    """`:seed=0:skip=N` is the tail of the seed-0 draw after its first N (the ones eval reports),
    whatever seed the caller (a training run) passes."""
    from onpolicy.data.tasks import load_task_set

    reported = load_task_set(f"{kind}:heldout", 30)
    tail = load_task_set(f"{kind}:heldout:seed=0:skip=30", 10, seed=7)
    assert [t.task_id for t in reported + tail] == [t.task_id for t in load_task_set(f"{kind}:heldout", 40)]
    assert not {t.prompt for t in tail} & {t.prompt for t in reported}
    assert [t.task_id for t in load_task_set(f"{kind}:heldout:seed=3", 5, seed=0)] == [
        t.task_id for t in load_task_set(f"{kind}:heldout", 5, seed=3)]
    assert [t.prompt for t in load_task_set(f"{kind}:heldout", 5, seed=3)] != [t.prompt for t in reported[:5]]


def test_prompt_is_cut_before_trailing_whitespace_and_the_model_writes_it():
    from onpolicy.data.tasks import completion_text, encode_prompt
    from onpolicy.tokenizer import train_tokenizer

    tok = train_tokenizer(['def f(xs):\n    """Doc."""\n    xs = xs[:3]\n    return xs\n' * 30],
                          vocab_size=300)
    prompt = 'def f(xs):\n    """Doc."""\n'
    ids, held_back = encode_prompt(tok, prompt)
    assert held_back == "\n" and tok.decode(ids) == prompt.rstrip()
    # trained text merges the newline with the indentation, so the bare "\n" ending is never conditioned on
    assert tok("\n    xs", add_special_tokens=False)["input_ids"][0] != tok("\n",
                                                                            add_special_tokens=False)["input_ids"][0]
    written = tok("\n    return xs\n\ndef g():\n    pass", add_special_tokens=False)["input_ids"]
    assert completion_text(tok, written, held_back) == "    return xs\n"  # prompt + this = the program


def test_evaluate_checkpoint_aggregates_pass_at_k():
    from onpolicy.evaluation import evaluate_checkpoint, markdown_table
    from onpolicy.sampling import SamplerConfig
    from onpolicy.tokenizer import train_tokenizer
    from verifiers import Verdict

    tok = train_tokenizer(["def solve(xs):\n    return xs\n" * 10], vocab_size=300)
    from onpolicy.model import DiffusionTransformer, DiffusionTransformerConfig
    from onpolicy.tokenizer import SpecialTokens

    special = SpecialTokens.from_tokenizer(tok)
    model = DiffusionTransformer(DiffusionTransformerConfig(vocab_size=special.vocab_size, hidden_size=32,
                                                            num_hidden_layers=1, num_attention_heads=2,
                                                            attention="block_causal", block_size=4)).eval()

    def level(task):
        return task.task_id.split("/")[2]

    class ByLevel:  # passes both samples of L1/L2 tasks, only sample 1 of the others
        def verify(self, tasks, completions):
            out, seen = [], {}
            for t in tasks:
                sample = seen.get(t.task_id, 0)
                seen[t.task_id] = sample + 1
                ok = level(t) in ("L1", "L2") or sample == 1
                out.append(Verdict(t.task_id, ok, float(ok), "passed" if ok else "failed", "", 0.0))
            return out

    tasks = generate_tasks("validation", 8)
    result = evaluate_checkpoint(model, tok, tasks, SamplerConfig(max_new_tokens=8), samples=2,
                                 verifier=ByLevel(), batch_size=4)
    easy = sum(level(t) in ("L1", "L2") for t in tasks)
    assert 0 < easy < len(tasks)  # the pinned values below cover both kinds
    assert result["pass@1"] == pytest.approx((easy + 0.5 * (len(tasks) - easy)) / len(tasks))
    assert result["pass@2"] == pytest.approx(1.0)
    assert result["status_counts"] == {"failed": len(tasks) - easy, "passed": len(tasks) + easy}
    expected = {lvl: 1.0 if lvl in ("L1", "L2") else 0.5 for lvl in {level(t) for t in tasks}}
    assert result["pass@1_by_level"] == pytest.approx(expected)
    assert result["forwards_per_token"] == pytest.approx(1 / result["tokens_per_forward"])
    assert len(result["samples_detail"]) == 2 * len(tasks)
    assert "| pass@2 | 1.000 |" in markdown_table("m", result)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_repair_tasks_reference_passes_and_buggy_input_fails():
    from onpolicy.data.generated import buggy_body, generate_repair_tasks
    from verifiers import PythonTestVerifier

    tasks = generate_repair_tasks("train", 60) + generate_repair_tasks("heldout", 40)
    assert all(t.task_id.startswith("repair/") and "# Fixed version:" in t.prompt for t in tasks)
    assert tasks[:10] == generate_repair_tasks("train", 60)[:10]  # deterministic
    with PythonTestVerifier() as v:
        fixed = v.verify(tasks, [t.canonical_solution for t in tasks])
        assert [(f.task_id, f.detail) for f in fixed if not f.passed] == []
        buggy = v.verify(tasks, [buggy_body(t) for t in tasks])
        assert [b.task_id for b in buggy if b.passed] == []
