"""Rewards from the ecosystem: our verifier inside a real TRL GRPOTrainer (infrastructure failures
reach TRL as None, excluded, never 0), TRL reward functions as verifiers, verl's compute_score, and
SandboxFusion's stdin field."""


import pytest

from verifiers.base import Task, Verdict

TASKS = [Task(f"t/{i}", f"def add{i}(a, b):\n", f"add{i}", "def check(f):\n    assert f(2, 3) == 5\n")
         for i in range(4)]


class FlakyVerifier:
    """Passes completions that return a + b; task t/3 is an infrastructure failure (excluded); a batch
    holding the word RAISE makes verify itself raise."""

    name = "flaky"

    def __init__(self, pass_all: bool = False):
        self.pass_all = pass_all

    def verify(self, tasks, completions):
        if any("RAISE" in c for c in completions):
            raise RuntimeError("verifier plugin crashed")
        ok = [self.pass_all or "a + b" in c for c in completions]
        return [Verdict(t.task_id, False, 0.0, "excluded", "server down",
                        0.0) if t.task_id == "t/3" else Verdict(t.task_id, p, float(p),
                                                                "passed" if p else "failed", "", 0.0) for t,
                p in zip(tasks, ok)]


def test_reward_function_gives_none_for_excluded_samples_and_a_broken_verifier():
    from verifiers.trl import as_reward_function

    reward = as_reward_function(FlakyVerifier(), {t.task_id: t for t in TASKS})
    ids = [t.task_id for t in TASKS]
    assert reward(["p"] * 4, ["    return a + b", "    return a - b", "    return a + b", "    return a + b"],
                  task_id=ids) == [1.0, 0.0, 1.0, None]
    assert reward(["p"] * 2, ["RAISE", "x"], task_id=ids[:2]) == [None, None]


def test_reward_function_verifier_passes_trls_keyword_arguments():
    from verifiers.trl import RewardFunctionVerifier

    seen = {}

    def trl_style(prompts, completions, completion_ids, trainer_state, task_id, entry_point, test, **kwargs):
        seen.update(kwargs, trainer_state=trainer_state, task_id=task_id)
        return [1.0 if "a + b" in c else None for c in completions]

    verdicts = RewardFunctionVerifier(trl_style).verify(TASKS[:2], ["    return a + b", "    return a"])
    assert [v.status for v in verdicts] == ["passed", "excluded"] and seen["task_id"] == ["t/0", "t/1"]
    assert "canonical_solution" in seen and "trainer_state" in seen


def test_verl_compute_score():
    from verifiers.verl import compute_score

    test = "def check(f):\n    assert f(2, 3) == 5\n"
    info = {"entry_point": "add", "prompt": "def add(a, b):\n"}
    good = compute_score("mine", "Sure:\n```python\ndef add(a, b):\n    return a + b\n```", test, info,
                         verifier=_sandbox())
    bad = compute_score("mine", "    return a - b\n", test, info, verifier=_sandbox())
    assert good == {"score": 1.0, "acc": 1.0, "excluded": 0.0} and bad["score"] == 0.0
    broken = compute_score("mine", "    return a + b", {"test": test, "entry_point": "add3"},
                           {"task_id": "t/3"}, verifier=FlakyVerifier())
    assert broken["excluded"] == 1.0
    with pytest.raises(ValueError, match="entry point"):
        compute_score("mine", "x", test, {})


_VERIFIER = None


def _sandbox():
    global _VERIFIER
    if _VERIFIER is None:
        from verifiers import PythonTestVerifier

        _VERIFIER = PythonTestVerifier(workers=1)
    return _VERIFIER


def test_serve_and_client_honour_stdin():
    import threading

    from verifiers.remote import RemoteVerifier, make_server
    from verifiers.sandbox import Sandbox

    with Sandbox(1) as pool:
        server = make_server("127.0.0.1", 0, pool)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            client = RemoteVerifier(f"http://127.0.0.1:{server.server_address[1]}")
            run = client.run_code("n = int(input())\nprint(sum(map(int, input().split())) * n)\n",
                                  stdin="2\n1 2 3\n")
            assert run["status"] == "Finished" and run["stdout"].strip() == "12"
            big = "x" * 200_000  # larger than a pipe's buffer
            run = client.run_code("import sys\nprint(len(sys.stdin.read()))\n", stdin=big)
            assert run["stdout"].strip() == "200000"
            # no stdin: empty input, not the worker's pipe
            run = client.run_code("import sys\nprint(repr(sys.stdin.read()))\n")
            assert run["stdout"].strip() == "''"
        finally:
            server.shutdown()


@pytest.mark.slow
def test_grpo_trainer_trains_with_our_verifier_as_its_reward(tmp_path):
    """A few real GRPOTrainer steps on a tiny causal model; samples of the excluded task (None) are
    left out of TRL's reward statistics rather than counted as 0."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from onpolicy.data.generated import generate_tasks
    from onpolicy.tokenizer import train_tokenizer
    from verifiers.trl import as_reward_function

    tok = train_tokenizer([t.prompt + t.canonical_solution for t in generate_tasks("train", 100)],
                          vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    calls = []

    # a second reward that varies inside each group, so GRPO has a signal
    def parity(prompts, completions, **columns):
        calls.append(len(completions))
        return [float(len(c) % 2) for c in completions]

    # every sample passes but those of t/3, whose verification "fails as infrastructure" (excluded)
    flaky = as_reward_function(FlakyVerifier(pass_all=True), {t.task_id: t for t in TASKS}, name="flaky")
    data = Dataset.from_dict({"prompt": [t.prompt for t in TASKS], "task_id": [t.task_id for t in TASKS]})
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, max_steps=2, learning_rate=1e-2,
                      per_device_train_batch_size=16, num_generations=4, max_completion_length=8,
                      logging_steps=1, report_to=[], save_strategy="no", seed=0, bf16=False, beta=0.0)
    trainer = GRPOTrainer(model=model, reward_funcs=[flaky, parity], args=args, train_dataset=data,
                          processing_class=tok)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.train()
    logs = [row for row in trainer.state.log_history if "rewards/flaky/mean" in row]
    assert len(logs) == 2 and len(calls) == 2
    # each step holds all four tasks: 4 samples of t/3 are left out (None), not scored 0 (mean 0.75)
    for row in logs:
        assert row["rewards/flaky/mean"] == 1.0, row
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())  # the model trained


def test_trl_adapter_says_why_a_verifier_raised_and_reads_fenced_code_like_verl_and_eval(caplog):
    from onpolicy.data.tasks import extract_code as eval_rule
    from verifiers.base import Task, Verdict
    from verifiers.trl import as_reward_function

    class Broken:
        def verify(self, tasks, completions):
            raise RuntimeError("sandbox image missing")

    class Echo:
        def verify(self, tasks, completions):
            self.seen = completions
            return [Verdict(t.task_id, True, 1.0, "passed", "", 0.0) for t in tasks]

    task = Task("t", "def f():\n", "f", "def check(c):\n    pass\n")
    with caplog.at_level("WARNING", logger="verifiers.trl"):
        assert as_reward_function(Broken(), {"t": task})(["p"], ["x"], task_id=["t"]) == [None]
    assert "sandbox image missing" in caplog.text
    echo = Echo()
    reply = "Here you go:\n```python\n    return 1\n```\nDone."
    assert as_reward_function(echo, {"t": task})(["p"], [reply], task_id=["t"]) == [1.0]
    assert echo.seen == ["    return 1\n"] == [eval_rule(reply)]
