"""Stage 4 end to end through `onpolicy train`, at toy size: verifier plugins that hang or raise, LoRA,
exact resume, two ranks under ZeRO-2."""

import json

import pytest
import torch

from .conftest import run_cli

RECIPE = "recipes/tiny/stage4_onpolicy.yaml"


def stage4(init, out, *extra, nproc=1):
    args = ["train", RECIPE, f"model.init_from={init}", f"logging.output_dir={out}", "rollout.prompts_per_step=2",
            "rollout.group_size=4", "rollout.n_tasks=20", "rollout.batch_size=4", "rollout.sampler.max_new_tokens=12",
            "validation.n_tasks=4", "validation.every=0", "train.micro_batch_size=4", "train.lr=3e-3", "train.warmup_steps=1",
            "logging.progress=false", "rollout.verifier=tests.plugins:CoinVerifier", "loss.surrogate=both", *extra]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    r = run_cli(*args)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_hanging_and_raising_verifier_costs_samples_not_the_run(init_model, tmp_path):
    """Every third verify call hangs forever, every third raises: the run finishes, those samples are
    excluded with their reasons, and each hang costs the timeout, not the run."""
    out = tmp_path / "flaky"
    r = stage4(init_model, out, "train.max_steps=2", "rollout.verifier=tests.plugins:FlakyVerifier", "rollout.verifier_timeout=2")
    steps = [m for m in metrics(out) if "reward" in m]
    assert len(steps) == 2
    excluded = {k: v for m in steps for k, v in m.items() if k.startswith("verifier/excluded/")}
    assert any("timeout" in k for k in excluded) and any("raised RuntimeError" in k for k in excluded), excluded
    assert all(m["verifier/excluded"] > 0 for m in steps)
    trl = ("loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "clip_ratio", "completions/mean_length")
    assert all(k in m for m in steps for k in trl), [sorted(m) for m in steps]
    assert all("entropy" in m for m in steps if m["train/rows_trained"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and (out / "final" / "model.safetensors").exists()
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_dynamic_sampling_replaces_groups_without_signal(init_model, tmp_path):
    """DAPO's dynamic sampling: with a verifier that passes all of a task's samples or none and an
    accuracy-only reward, no group is live: every extra round runs, decodes as many fresh prompts as are
    missing, and its dead groups are dropped. With a per-sample coin most groups are live: a step stops
    as soon as it has one live group per prompt, never with more."""
    dead = tmp_path / "dead"
    stage4(init_model, dead, "train.max_steps=1", "rollout.dynamic_sampling=2", "reward.alpha=0",
           "rollout.verifier=tests.plugins:TaskCoinVerifier")
    (m,) = [m for m in metrics(dead) if "reward" in m]
    assert (m["rollout/rounds"], m["rollout/prompts_decoded"], m["rollout/live_groups"]) == (3, 6, 0)
    assert m["frac_reward_zero_std"] == 1.0
    live = tmp_path / "live"
    stage4(init_model, live, "train.max_steps=2", "rollout.dynamic_sampling=3")
    for m in [m for m in metrics(live) if "reward" in m]:
        assert m["rollout/live_groups"] <= 2 and (m["rollout/live_groups"] == 2 or m["rollout/rounds"] == 4), m
        assert m["rollout/prompts_decoded"] >= 2 and m["time/step"] >= m["time/rollout"] + m["time/verify"]


@pytest.mark.slow
def test_stage4_moves_the_model_to_the_rollout_block_size(init_model, tmp_path):
    """rollout.sampler.block_size above the model's: the start is judged at its own block (the bar), then
    rollouts, replay, validation and the export use the new block."""
    out = tmp_path / "grow"
    r = stage4(init_model, out, "train.max_steps=1", "rollout.sampler.block_size=8")
    assert "block size 4 -> 8" in r.stdout + r.stderr
    assert json.loads((init_model / "config.json").read_text())["block_size"] == 4
    final = json.loads((out / "final" / "config.json").read_text())
    assert final["block_size"] == 8 and final["decoding"]["block_size"] == 8  # not the start's recommended block
    assert json.loads((out / "model" / "config.json").read_text())["block_size"] == 8  # export --step N of a checkpoint
    assert json.loads((out / "best" / "config.json").read_text())["block_size"] == 4  # the start, until a better one
    assert len([m for m in metrics(out) if "reward" in m]) == 1


@pytest.mark.slow
def test_distill_failed_feeds_failed_rollouts_to_the_jump_term(init_model, tmp_path):
    """Nothing passes: by default no row carries a signal and the weights stay; with
    loss.distill_failed=1 every rollout is self-distilled by the jump term and the weights move, at every
    replayed state or (loss.jump_states=sampled: they carry no policy gradient) at one drawn state per block;
    with loss.anchor=1 the prompts' reference solutions train instead."""
    runs = {}
    for name, extra in (("off", ["loss.distill_failed=0", "loss.jump_states=every"]),
                        ("every", ["loss.distill_failed=1", "loss.jump_states=every"]),
                        ("sampled", ["loss.distill_failed=1", "loss.jump_states=sampled"]),
                        ("anchor", ["loss.distill_failed=0", "loss.jump_states=sampled", "loss.anchor=1",
                                    "rollout.sampler.max_new_tokens=64"])):
        out = tmp_path / name
        stage4(init_model, out, "train.max_steps=1", "reward.alpha=0", "loss.surrogate=jump", "loss.buffer_size=0",
               "rollout.verifier=tests.plugins:FailAllVerifier", *extra)
        (runs[name],) = [m for m in metrics(out) if "reward" in m]
        moved = any(not torch.equal(a, b) for a, b in zip(weights(init_model).values(), weights(out / "final").values()))
        assert moved == (name != "off"), name
    assert runs["off"]["train/rows_trained"] == 0 and runs["off"]["rollout/pass_rate"] == 0.0
    assert runs["every"]["train/rows_trained"] == runs["every"]["train/rows_distilled_failed"] == 8 and runs["every"]["jump_ce"] > 0
    assert runs["every"]["train/rows_jump_only_sampled"] == 0 and "jump_ce_sampled" not in runs["every"]
    sampled = runs["sampled"]
    assert sampled["train/rows_jump_only_sampled"] == sampled["train/rows_distilled_failed"] == 8
    assert sampled["jump_ce_sampled"] > 0 and "jump_ce" not in sampled  # no row went through the full replay
    # no policy gradient anywhere: nothing clipped, no KL, a zero pg term; the loss is the jump term's
    assert (sampled["pg_loss"], sampled["kl"], sampled["clip_ratio"]) == (0.0, 0.0, 0.0)
    assert runs["off"]["loss"] == 0.0 and sampled["loss"] > 0 and runs["every"]["loss"] > 0
    assert sampled["entropy"] > 0 and runs["every"]["entropy"] > 0
    # loss.anchor: the two prompts' reference solutions are all that trains (the jump term, one state per block)
    anchor = runs["anchor"]
    assert anchor["train/rows_anchor"] == anchor["train/rows_trained"] == anchor["train/rows_jump_only_sampled"] == 2
    assert anchor["train/rows_distilled_failed"] == 0 and anchor["jump_ce_sampled"] > 0 and anchor["loss"] > 0
    assert runs["off"]["train/rows_anchor"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("lora", [0, 4])
def test_stage4_trains_with_and_without_lora(init_model, tmp_path, lora):
    out = tmp_path / f"lora{lora}"
    stage4(init_model, out, "train.max_steps=2", f"lora.r={lora}")
    rows = [m for m in metrics(out) if "reward" in m]
    assert sum(m["train/rows_trained"] for m in rows) > 0 and all("pg_loss" in m for m in rows if m["train/rows_trained"])
    before, after = weights(init_model), weights(out / "final")
    assert set(before) == set(after)  # LoRA exports a plain, merged model
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no weight moved"
    if lora:
        assert all("embed" not in k for k in changed)  # adapters sit on the linear layers only
    # a few completions per step with their verdicts, beside the metrics (what a verifier plugin saw)
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert logged and {"step", "task_id", "completion", "passed", "score", "status", "reward"} <= set(logged[0])
    assert max(sum(r["step"] == s for r in logged) for s in {r["step"] for r in logged}) <= 4


@pytest.mark.slow
def test_stage4_resume_gives_the_same_next_losses(init_model, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("train.max_steps=4", "train.save_every=2")
    stage4(init_model, straight, *common)
    stage4(init_model, split, *common, "train.stop_at_step=2")
    r = stage4(init_model, split, *common)
    assert "resumed at step 2" in r.stdout + r.stderr
    a = {m["step"]: m for m in metrics(straight) if "reward" in m}
    b = {m["step"]: m for m in metrics(split) if "reward" in m}
    for step in (3, 4):
        for key in ("reward", "rollout/pass_rate", "rollout/tokens_per_forward", "pg_loss"):
            if key in a[step]:
                assert a[step][key] == b[step][key], (step, key)


@pytest.mark.distributed
def test_stage4_two_ranks_zero2(init_model, tmp_path):
    out = tmp_path / "z2"
    r = stage4(init_model, out, "train.max_steps=2", "train.deepspeed=recipes/deepspeed/zero2.json", "train.threads=1",
               "rollout.dynamic_sampling=1", nproc=2)  # the ranks agree on the rounds (a collective per round)
    assert "world=2" in r.stdout + r.stderr and "ZeRO-2" in r.stdout + r.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_step_seconds_reads_time_step_or_sums_the_split():
    from onpolicy.metrics import step_seconds

    assert step_seconds({"time/step": 9.5, "time/rollout": 1.0, "time/verify": 1.0, "time/train": 1.0}) == 9.5
    assert step_seconds({"time/rollout": 2.0, "time/verify": 0.5, "time/train": 4.0}) == 6.5  # runs logged before time/step


def test_only_rows_without_policy_gradient_or_progress_cost_take_the_sampled_jump():
    """loss.jump_states=sampled sends a row to the one-forward jump term only when the jump is all it feeds:
    advantage 0, picked for distillation, and no progress cost to read its every step (surrogate both and passed)."""
    from onpolicy.config import OnPolicyConfig
    from onpolicy.trainers.onpolicy import is_jump_only

    def cfg(states, surrogate):
        c = OnPolicyConfig()
        c.loss.jump_states, c.loss.surrogate = states, surrogate
        return c

    sampled = cfg("sampled", "jump")
    assert is_jump_only(0.0, False, 1.0, sampled) and is_jump_only(0.0, True, 1.0, sampled)  # failed pick; buffer / all-pass group
    assert not is_jump_only(0.5, True, 1.0, sampled) and not is_jump_only(-0.5, False, 1.0, sampled)  # policy gradient
    assert not is_jump_only(0.0, False, 0.0, sampled)  # not picked for distillation
    assert not is_jump_only(0.0, False, 1.0, cfg("every", "jump"))
    assert not is_jump_only(0.0, True, 1.0, cfg("sampled", "both")) and is_jump_only(0.0, False, 1.0, cfg("sampled", "both"))
    assert not is_jump_only(0.0, True, 1.0, cfg("sampled", "progress"))


def test_best_checkpoint_rule_counts_pass_rates_exactly_at_the_tolerance_edge():
    """36/300 is exactly 2 points below 42/300; float subtraction (0.14 - 0.02) put it 1e-17 outside."""
    from onpolicy.trainers.onpolicy import is_better

    def val(slow, fast, speed):
        return {"slow": {"pass@1": slow}, "fast": {"pass@1": fast, "tokens_per_forward": speed}}

    bar, start = 42 / 300, val(42 / 300, 40 / 300, 2.2)
    assert is_better(val(36 / 300, 36 / 300, 2.5), start, bar, 0.02)
    assert not is_better(val(36 / 300, 35 / 300, 2.5), start, bar, 0.02)  # fast pass@1 one task under the edge
    assert not is_better(val(42 / 300, 42 / 300, 2.1), start, bar, 0.02)  # within, but slower than the best
    assert is_better(val(36 / 300, 36 / 300, 2.5), None, bar, 0.02)


def test_a_reference_solution_replays_as_its_masked_states(init_model):
    """loss.anchor's rows: the reference solution and its EOS, committed one token per step in a seeded
    random order within each block; its replay shows, at step j of a block, exactly the j tokens committed
    before (the masked-diffusion corruptions of the reference); the rest of the EOS block stays masked."""
    import dataclasses

    from onpolicy.data.generated import generate_tasks
    from onpolicy.data.tasks import encode_prompt
    from onpolicy.loading import load_model
    from onpolicy.rollout import reference_trajectory, replay_step_logits
    from onpolicy.tokenizer import SpecialTokens

    model, tok = load_model(init_model)
    special = SpecialTokens.from_tokenizer(tok)
    task = generate_tasks("train", 1)[0]
    row = reference_trajectory(tok, task, 4, 96, torch.Generator().manual_seed(0))
    prompt, held_back = encode_prompt(tok, task.prompt)
    n = len(row.tokens)
    assert row.prompt == prompt and tok.decode(row.tokens) == held_back + task.canonical_solution
    assert len(row.canvas) == -(-(n + 1) // 4) * 4 and int(row.canvas[n]) == special.eos
    assert (row.commit_forward[: n + 1] > 0).all() and (row.commit_forward[n + 1 :] == 0).all()
    steps = list(replay_step_logits(model, [row], special))
    order = torch.stack([st.now[0] for st in steps]).long().argmax(0)  # each position's step within its block
    for start in range(0, n + 1, 4):
        span = min(4, n + 1 - start)
        assert sorted(order[start : start + span].tolist()) == list(range(span))  # one token per step
        for j, st in enumerate(steps):
            index = st.step_index[0, start : start + 4]
            shown = (index >= 0) & (index < j)  # what the replay unmasks at step j
            assert shown.sum() == min(j, span) and not shown[span:].any()  # the uncommitted tail of the EOS block stays masked
    orders = {tuple(reference_trajectory(tok, task, 4, 96, torch.Generator().manual_seed(s)).commit_forward.tolist())
              for s in range(5)}
    assert len(orders) > 1 and tuple(row.commit_forward.tolist()) in orders  # seeded: the same draw again, others differ
    assert reference_trajectory(tok, dataclasses.replace(task, canonical_solution=""), 4, 96, torch.Generator()) is None
    assert reference_trajectory(tok, task, 4, n, torch.Generator()) is None  # longer than the sampler may write


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_trainer_scores_commit_decisions_as_the_sampler_drew_them(make_model, special, monkeypatch, attention):
    """Soft commits over three blocks: the decision log-probability the trainer replays equals the one of
    the decisions the sampler drew (a bidirectional canvas once counted every later block as open)."""
    from onpolicy import sampling
    from onpolicy.diffusion.policy import soft_commit_logprob
    from onpolicy.rollout import replay_step_logits
    from onpolicy.sampling import SamplerConfig, generate
    from onpolicy.trainers.onpolicy import commit_decisions, open_positions

    model = make_model(attention, block_size=4, initializer_range=0.3)  # confident: top probabilities near the threshold
    cfg = SamplerConfig(max_new_tokens=12, block_size=4, threshold=0.5, commit_temperature=0.2, stop_at_eos=False)
    drawn = []
    real = sampling._soft_commit_mask

    def spy(score, open_, cfg_, generators, rows):
        chosen = real(score, open_, cfg_, generators, rows)
        drawn.append(soft_commit_logprob(score.float(), open_, chosen, cfg_.threshold, cfg_.commit_temperature)[0])
        return chosen

    monkeypatch.setattr(sampling, "_soft_commit_mask", spy)
    traj = generate(model, [[5, 6, 7, 8]], special, cfg, seeds=[3])
    replayed = torch.zeros(())
    with torch.no_grad():
        for st in replay_step_logits(model, [traj.row(0)], special):
            dec, made = commit_decisions(st, st.logits.float().log_softmax(-1), open_positions(st), cfg.threshold,
                                         cfg.commit_temperature)
            replayed = replayed + (dec * made).sum()
    assert len(drawn) >= 3 and float(sum(drawn)) < -0.01  # decisions with some uncertainty were drawn
    assert float(replayed) == pytest.approx(float(sum(drawn)), abs=1e-4)


def test_kl_reference_is_the_base_with_the_lora_adapters_off(make_model, special):
    """With trained (non-zero) adapters the live policy differs from its base: the KL term is > 0 and has a
    gradient on the adapters (it once compared the live model with itself: identically 0)."""
    from peft import LoraConfig, get_peft_model

    from onpolicy.config import OnPolicyConfig
    from onpolicy.sampling import SamplerConfig, generate
    from onpolicy.trainers.onpolicy import Reference, micro_batch_loss

    model = get_peft_model(make_model("block_causal", block_size=4), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    traj = generate(model, [[5, 6, 7, 8], [9, 10, 11]], special, SamplerConfig(max_new_tokens=8), seeds=[0, 1])
    rows = [traj.row(i) for i in range(2)]
    cfg = OnPolicyConfig()
    cfg.loss.beta, cfg.loss.surrogate = 1.0, "none"
    two = torch.ones(2)
    loss, stats = micro_batch_loss(model, Reference(model, cfg.loss.beta), rows, special, torch.tensor([1.0, -1.0]),
                                   two.bool(), torch.zeros(2), cfg, 4, torch.device("cpu"))
    assert float(stats["kl"]) > 1e-4
    assert float(stats["replay_drift_max"]) < 1e-4  # a first update replays exactly what the sampler recorded
    cfg.loss.beta = 0.0
    without, _ = micro_batch_loss(model, Reference(model, 0.0), rows, special, torch.tensor([1.0, -1.0]), two.bool(),
                                  torch.zeros(2), cfg, 4, torch.device("cpu"))
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    grads = torch.autograd.grad(loss - without, lora, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_programs_that_hang_to_their_own_timeout_are_failures_not_exclusions():
    """A chunk of hanging programs takes as long as their own timeouts add up; the pool waits for that
    (the verifier says how long) instead of calling the chunk an infrastructure failure."""
    import time

    from onpolicy.rollout import VerifierPool
    from verifiers.base import Task, Verdict

    class Hanging:
        def verify(self, tasks, completions):
            time.sleep(0.6)
            return [Verdict(t.task_id, False, 0.0, "timeout", "ran past its timeout", 0.3) for t in tasks]

        def worst_case_seconds(self, n):
            return 0.3 * n

    tasks = [Task(f"t{i}", "", "f", "") for i in range(4)]
    verdicts = VerifierPool(Hanging(), timeout_s=0.1).verify(tasks, ["x"] * 4)
    assert [v.status for v in verdicts] == ["timeout"] * 4
