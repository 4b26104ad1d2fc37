"""Stage 4 end to end through `onpolicy train`, at toy size: verifier plugins that hang or raise, LoRA,
exact resume, two ranks under ZeRO-2."""

import json

import pytest
import torch

from .conftest import run_cli

RECIPE = "recipes/tiny/stage4_onpolicy.yaml"


def stage4(init, out, *extra, nproc=1):
    args = ["train", RECIPE, f"model.init_from={init}", f"logging.output_dir={out}",
            "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.n_tasks=20",
            "rollout.batch_size=4", "rollout.sampler.max_new_tokens=12", "validation.n_tasks=4",
            "validation.every=0", "train.micro_batch_size=4", "train.lr=3e-3", "train.warmup_steps=1",
            "logging.progress=false", "rollout.verifier=tests.plugins:CoinVerifier", "loss.surrogate=both",
            *extra]
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
    r = stage4(init_model, out, "train.max_steps=2", "rollout.verifier=tests.plugins:FlakyVerifier",
               "rollout.verifier_timeout=2")
    steps = [m for m in metrics(out) if "reward" in m]
    assert len(steps) == 2
    excluded = {k: v for m in steps for k, v in m.items() if k.startswith("verifier/excluded/")}
    assert (any("timeout" in k for k in excluded)
            and any("raised RuntimeError" in k for k in excluded)), excluded
    assert all(m["verifier/excluded"] > 0 for m in steps)
    trl = ("loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "clip_ratio",
           "completions/mean_length")
    assert all(k in m for m in steps for k in trl), [sorted(m) for m in steps]
    # entropy: the policy's, at the tokens of on-policy rows replayed step by step (not
    # anchors or sampled states)
    assert all("entropy" in m for m in steps
               if m["train/rows_trained"] > m["train/rows_jump_only_sampled"] + m["train/rows_anchor"])
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
        assert (m["rollout/live_groups"] <= 2
                and (m["rollout/live_groups"] == 2 or m["rollout/rounds"] == 4)), m
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
    # not the start's recommended block export --step N of a checkpoint
    assert final["block_size"] == 8 and final["decoding"]["block_size"] == 8
    assert json.loads((out / "model" / "config.json").read_text())["block_size"] == 8
    # the start, until a better one
    assert json.loads((out / "best" / "config.json").read_text())["block_size"] == 4
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
        stage4(init_model, out, "train.max_steps=1", "reward.alpha=0", "loss.surrogate=jump",
               "loss.buffer_size=0", "rollout.verifier=tests.plugins:FailAllVerifier", *extra)
        (runs[name],) = [m for m in metrics(out) if "reward" in m]
        moved = any(not torch.equal(a, b) for a,
                    b in zip(weights(init_model).values(), weights(out / "final").values()))
        assert moved == (name != "off"), name
    assert runs["off"]["train/rows_trained"] == 0 and runs["off"]["rollout/pass_rate"] == 0.0
    assert (runs["every"]["train/rows_trained"] == runs["every"]["train/rows_distilled_failed"] == 8
            and runs["every"]["jump_ce"] > 0)
    assert runs["every"]["train/rows_jump_only_sampled"] == 0 and "jump_ce_sampled" not in runs["every"]
    sampled = runs["sampled"]
    assert sampled["train/rows_jump_only_sampled"] == sampled["train/rows_distilled_failed"] == 8
    assert sampled["jump_ce_sampled"] > 0 and "jump_ce" not in sampled  # no row went through the full replay
    # no policy gradient anywhere: nothing clipped, no KL, a zero pg term; the loss is the jump term's
    assert (sampled["pg_loss"], sampled["kl"], sampled["clip_ratio"]) == (0.0, 0.0, 0.0)
    assert runs["off"]["loss"] == 0.0 and sampled["loss"] > 0 and runs["every"]["loss"] > 0
    # entropy: the policy's at the tokens it committed, from rows replayed step by step (not at drawn states)
    assert runs["every"]["entropy"] > 0 and "entropy" not in sampled
    # loss.anchor: the two prompts' reference solutions are all that trains (the jump
    # term, one state per block)
    anchor = runs["anchor"]
    assert (anchor["train/rows_anchor"] == anchor["train/rows_trained"]
            == anchor["train/rows_jump_only_sampled"] == 2)
    assert anchor["train/rows_distilled_failed"] == 0 and anchor["jump_ce_sampled"] > 0 and anchor["loss"] > 0
    assert runs["off"]["train/rows_anchor"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("lora", [0, 4])
def test_stage4_trains_with_and_without_lora(init_model, tmp_path, lora):
    out = tmp_path / f"lora{lora}"
    stage4(init_model, out, "train.max_steps=2", f"lora.r={lora}")
    rows = [m for m in metrics(out) if "reward" in m]
    assert (sum(m["train/rows_trained"] for m in rows) > 0
            and all("pg_loss" in m for m in rows if m["train/rows_trained"]))
    before, after = weights(init_model), weights(out / "final")
    assert set(before) == set(after)  # LoRA exports a plain, merged model
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no weight moved"
    if lora:
        assert all("embed" not in k for k in changed)  # adapters sit on the linear layers only
    # a few completions per step with their verdicts, beside the metrics (what a verifier plugin saw)
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert (logged and {"step", "task_id", "completion", "passed", "score", "status",
                        "reward"} <= set(logged[0]))
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
    r = stage4(init_model, out, "train.max_steps=2", "train.deepspeed=recipes/deepspeed/zero2.json",
               # the ranks agree on the rounds (a collective per round)
               "train.threads=1", "rollout.dynamic_sampling=1", nproc=2)
    assert "world=2" in r.stdout + r.stderr and "ZeRO-2" in r.stdout + r.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_step_seconds_reads_time_step_or_sums_the_split():
    from onpolicy.metrics import step_seconds

    assert step_seconds({"time/step": 9.5, "time/rollout": 1.0, "time/verify": 1.0, "time/train": 1.0}) == 9.5
    # runs logged before time/step
    assert step_seconds({"time/rollout": 2.0, "time/verify": 0.5, "time/train": 4.0}) == 6.5


def test_only_rows_without_policy_gradient_or_progress_cost_take_the_sampled_jump():
    """loss.jump_states=sampled sends a row to the one-forward jump term only when the jump is all it feeds:
    advantage 0, picked for distillation, and no progress cost to read its every step (surrogate both and
    passed)."""
    from onpolicy.config import OnPolicyConfig
    from onpolicy.trainers.onpolicy import is_jump_only

    def cfg(states, surrogate):
        c = OnPolicyConfig()
        c.loss.jump_states, c.loss.surrogate = states, surrogate
        return c

    sampled = cfg("sampled", "jump")
    # failed pick; buffer / all-pass group
    assert is_jump_only(0.0, False, 1.0, sampled) and is_jump_only(0.0, True, 1.0, sampled)
    # policy gradient
    assert not is_jump_only(0.5, True, 1.0, sampled) and not is_jump_only(-0.5, False, 1.0, sampled)
    assert not is_jump_only(0.0, False, 0.0, sampled)  # not picked for distillation
    assert not is_jump_only(0.0, False, 1.0, cfg("every", "jump"))
    assert (not is_jump_only(0.0, True, 1.0, cfg("sampled", "both"))
            and is_jump_only(0.0, False, 1.0, cfg("sampled", "both")))
    assert not is_jump_only(0.0, True, 1.0, cfg("sampled", "progress"))


def test_best_checkpoint_rule_counts_pass_rates_exactly_at_the_tolerance_edge():
    """36/300 is exactly 2 points below 42/300; float subtraction (0.14 - 0.02) put it 1e-17 outside."""
    from onpolicy.trainers.onpolicy import is_better

    def val(slow, fast, speed):
        return {"slow": {"pass@1": slow}, "fast": {"pass@1": fast, "tokens_per_forward": speed}}

    bar, start = 42 / 300, val(42 / 300, 40 / 300, 2.2)
    assert is_better(val(36 / 300, 36 / 300, 2.5), start, bar, 0.02)
    # fast pass@1 one task under the edge
    assert not is_better(val(36 / 300, 35 / 300, 2.5), start, bar, 0.02)
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
            # the uncommitted tail of the EOS block stays masked
            assert shown.sum() == min(j, span) and not shown[span:].any()
    orders = {tuple(reference_trajectory(tok, task, 4, 96,
                                         torch.Generator().manual_seed(s)).commit_forward.tolist())
              for s in range(5)}
    # seeded: the same draw again, others differ
    assert len(orders) > 1 and tuple(row.commit_forward.tolist()) in orders
    assert reference_trajectory(tok, dataclasses.replace(task, canonical_solution=""), 4, 96,
                                torch.Generator()) is None
    # longer than the sampler may write
    assert reference_trajectory(tok, task, 4, n, torch.Generator()) is None


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_trainer_scores_commit_decisions_as_the_sampler_drew_them(make_model, special, monkeypatch,
                                                                  attention):
    """Soft commits over three blocks: the decision log-probability the trainer replays equals the one of
    the decisions the sampler drew (a bidirectional canvas once counted every later block as open)."""
    from onpolicy import sampling
    from onpolicy.diffusion.policy import soft_commit_logprob
    from onpolicy.rollout import replay_step_logits
    from onpolicy.sampling import SamplerConfig, generate
    from onpolicy.trainers.onpolicy import commit_decisions, open_positions

    model = make_model(attention, block_size=4, initializer_range=0.3)  # confident: top probabilities near
    # the threshold
    cfg = SamplerConfig(max_new_tokens=12, block_size=4, threshold=0.5, commit_temperature=0.2,
                        stop_at_eos=False)
    drawn = []
    real = sampling._soft_commit_mask

    def spy(score, open_, cfg_, generators, rows):
        chosen = real(score, open_, cfg_, generators, rows)
        drawn.append(soft_commit_logprob(score.float(), open_, chosen, cfg_.threshold,
                                         cfg_.commit_temperature)[0])
        return chosen

    monkeypatch.setattr(sampling, "_soft_commit_mask", spy)
    traj = generate(model, [[5, 6, 7, 8]], special, cfg, seeds=[3])
    replayed = torch.zeros(())
    with torch.no_grad():
        for st in replay_step_logits(model, [traj.row(0)], special):
            dec, made = commit_decisions(st, st.logits.float().log_softmax(-1), open_positions(st),
                                         cfg.threshold, cfg.commit_temperature)
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

    model = get_peft_model(make_model("block_causal", block_size=4),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    traj = generate(model, [[5, 6, 7, 8], [9, 10, 11]], special, SamplerConfig(max_new_tokens=8),
                    seeds=[0, 1])
    rows = [traj.row(i) for i in range(2)]
    cfg = OnPolicyConfig()
    cfg.loss.beta, cfg.loss.surrogate = 1.0, "none"
    two = torch.ones(2)
    loss, stats = micro_batch_loss(model, Reference(model, cfg.loss.beta), rows, special,
                                   torch.tensor([1.0, -1.0]), two.bool(), torch.zeros(2), cfg, 4,
                                   torch.device("cpu"))
    assert float(stats["kl"]) > 1e-4
    assert float(stats["replay_drift_max"]) < 1e-4  # a first update replays exactly what the sampler recorded
    cfg.loss.beta = 0.0
    without, _ = micro_batch_loss(model, Reference(model, 0.0), rows, special, torch.tensor([1.0, -1.0]),
                                  two.bool(), torch.zeros(2), cfg, 4, torch.device("cpu"))
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


def test_jump_targets_are_strictly_later_than_the_state():
    """From state s_j the jump predicts what steps j+1 .. j+gap commit; step j's own commits belong to the
    policy term (the jump once included them, pushing failed rows toward the very tokens their advantage
    pushed away from)."""
    from types import SimpleNamespace

    from onpolicy.trainers.onpolicy import jump_positions

    st = SimpleNamespace(step_index=torch.tensor([[0, 1, 1, 2, 3, -1]]), index=1)
    assert jump_positions(st, 2).tolist() == [[False, False, False, True, True, False]]
    assert jump_positions(st, 1).tolist() == [[False, False, False, True, False, False]]


def _samples(passed: list[bool], forwards: list[int]):
    from onpolicy.trainers.onpolicy import StepSamples

    class Row:  # what training_rows reads of a rollout
        def __init__(self, i):
            self.trajectory, self.forwards = f"row{i}", forwards[i]

    n = len(passed)
    return StepSamples([Row(i) for i in range(n)], torch.zeros(n), torch.ones(n, dtype=torch.bool),
                       torch.tensor(passed))


def test_failed_rows_with_a_policy_gradient_are_never_distilled():
    """`loss.distill_failed` self-distils only failed rows without advantage (all-fail groups); a failed row
    of a mixed group carries a negative advantage and is not trained toward its own tokens."""
    from onpolicy.config import OnPolicyConfig
    from onpolicy.trainers.onpolicy import training_rows

    cfg = OnPolicyConfig()
    cfg.loss.distill_failed, cfg.loss.distill_rows, cfg.loss.anchor = 0.5, 8, 0.0
    got = _samples([True, False, False, False], [3, 3, 3, 3])  # group 0: one pass; group 1: none
    adv = torch.tensor([1.5, -0.5, 0.0, 0.0])
    rows = {it.trajectory: it for it in training_rows(got, adv, [], None, cfg, step=0)}
    assert rows["row0"].distill == 1.0 and rows["row0"].advantage == 1.5
    assert rows["row1"].distill == 0.0 and rows["row1"].advantage == -0.5  # the policy term only
    assert rows["row2"].distill == 0.5 and rows["row3"].distill == 0.5


def test_groups_whose_speeds_differ_by_noise_get_no_advantage():
    from onpolicy.diffusion.policy import speed_noise_groups

    passed = torch.tensor([[True, True], [True, True], [True, False], [True, True]])
    valid = torch.tensor([[True, True], [True, True], [True, True], [True, False]])
    forwards = torch.tensor([[10, 11], [10, 14], [10, 11], [10, 99]])
    # all pass, one forward apart: noise; four apart: signal; a failure: signal; the
    # excluded sample does not count
    assert speed_noise_groups(passed, valid, forwards, 2).tolist() == [True, False, False, True]
    assert speed_noise_groups(passed, valid, forwards, 0).tolist() == [False, False, False, False]


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_step_normalised_policy_terms_do_not_depend_on_the_micro_batch_split(make_model, special, loss_type):
    """dapo and dr_grpo divide every micro-batch by the whole step's count (as TRL does over gradient
    accumulation): one micro-batch of four rows and two of two give the same gradient."""
    from onpolicy.config import OnPolicyConfig
    from onpolicy.sampling import SamplerConfig, generate
    from onpolicy.trainers.onpolicy import Reference, TrainRow, micro_batch_loss, step_pg_denominators

    model = make_model("block_causal", block_size=4, initializer_range=0.3)
    cfg = OnPolicyConfig()
    cfg.loss.loss_type, cfg.loss.surrogate = loss_type, "none"
    cfg.rollout.sampler = SamplerConfig(max_new_tokens=12, block_size=4, threshold=0.5,
                                        commit_temperature=0.2, stop_at_eos=False)
    traj = generate(model, [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]], special, cfg.rollout.sampler,
                    seeds=[0, 1, 2, 3])
    rows = [traj.row(i) for i in range(4)]
    rows[1].verified = 5  # a row cut by a stop sequence: its later positions are in no term
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    items = [TrainRow(r, float(a), False, True, 0.0) for r, a in zip(rows, adv)]
    dens = step_pg_denominators(items, special, "block_causal", cfg)
    assert dens[0] is not None and dens[1] is not None

    def grads(splits):
        model.zero_grad()
        for part in splits:
            loss, _ = micro_batch_loss(model, Reference(model, 0.0), [rows[i] for i in part], special,
                                       adv[part], torch.zeros(len(part), dtype=torch.bool),
                                       torch.zeros(len(part)), cfg, 2, torch.device("cpu"),
                                       share=len(part) / 4, pg_denominators=dens)
            loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole, halves = grads([[0, 1, 2, 3]]), grads([[0, 2], [1, 3]])
    assert whole.abs().sum() > 0
    assert torch.allclose(whole, halves, atol=1e-6, rtol=1e-4)


def test_cut_positions_are_in_no_term(make_model, special):
    """Positions past a row's verified text (a stop sequence cut the program there) carry no token or
    decision term: the step's counts drop by exactly what lies past the cut."""
    from onpolicy.sampling import SamplerConfig, generate
    from onpolicy.trainers.onpolicy import pg_term_counts

    model = make_model("block_causal", block_size=4)
    cfg = SamplerConfig(max_new_tokens=12, block_size=4, stop_at_eos=False)
    row = generate(model, [[5, 6, 7, 8]], special, cfg, seeds=[0]).row(0)
    tokens, decisions = pg_term_counts([row], special, "block_causal", True)
    assert (tokens, decisions) == (12, 12)  # one token per step: every position is a token and a decision
    row.verified = 6
    assert pg_term_counts([row], special, "block_causal", True) == (6, 6)


def test_verified_length_covers_the_text_the_verifier_ran(init_model):
    from onpolicy.rollout import verified_length
    from onpolicy.tokenizer import load_tokenizer

    tok = load_tokenizer(init_model)
    body = "\n    return x + 1\n"
    ids = tok(body + "\ndef other():\n    pass", add_special_tokens=False)["input_ids"]
    n = verified_length(tok, ids, "\n", finished=True)
    assert (tok.decode(ids[: n - 1]).startswith(body[: len(tok.decode(ids[: n - 1]))])
            and len(tok.decode(ids[:n])) > len(body))
    assert "pass" not in tok.decode(ids[:n])  # the next function's body was never run
    assert verified_length(tok, ids[:3], "\n", finished=True) == 4  # uncut: every token and the EOS
    assert verified_length(tok, ids[:3], "\n", finished=False) == 3


def test_sampled_rollouts_record_the_behaviour_policy(make_model, special):
    """With temperature and top-k the token term's recorded log-prob is the one of the distribution the token
    was drawn from, and the replay computes the same (drift 0 at the first update), not the temperature-1
    log-prob (which differs)."""
    from onpolicy.config import OnPolicyConfig
    from onpolicy.sampling import SamplerConfig, generate
    from onpolicy.trainers.onpolicy import Reference, micro_batch_loss

    model = make_model("block_causal", block_size=4, initializer_range=0.3)
    cfg = OnPolicyConfig()
    cfg.loss.surrogate = "none"
    cfg.rollout.sampler = SamplerConfig(max_new_tokens=8, block_size=4, threshold=0.5, commit_temperature=0.2,
                                        temperature=0.7, top_k=5, stop_at_eos=False)
    traj = generate(model, [[5, 6, 7, 8], [9, 10]], special, cfg.rollout.sampler, seeds=[0, 1])
    rows = [traj.row(i) for i in range(2)]
    assert rows[0].behaviour_logprob is not None
    assert not torch.allclose(rows[0].behaviour_logprob, rows[0].commit_logprob)
    with torch.no_grad():
        _, stats = micro_batch_loss(model, Reference(model, 0.0), rows, special, torch.tensor([1.0, -1.0]),
                                    torch.zeros(2, dtype=torch.bool), torch.zeros(2), cfg, 2,
                                    torch.device("cpu"))
    assert float(stats["replay_drift_max"]) < 1e-4


@pytest.mark.slow
def test_several_updates_per_batch_move_the_ratio_and_the_clip_binds(init_model, tmp_path):
    """`loss.updates_per_batch=3` on sampled rollouts: past the first update the replayed log-probs leave the
    recorded ones (drift > 0) and some terms are clipped; with one update the ratio stays 1 (drift ~0)."""
    runs = {}
    for updates in (1, 3):
        out = tmp_path / f"u{updates}"
        stage4(init_model, out, "train.max_steps=1", f"loss.updates_per_batch={updates}", "train.lr=3e-2",
               "loss.epsilon=0.01", "loss.epsilon_high=0.01", "rollout.sampler.temperature=0.9",
               "rollout.verifier=tests.plugins:CoinVerifier", "reward.min_speed_spread=0")
        (runs[updates],) = [m for m in metrics(out) if "reward" in m]
    assert runs[1]["replay_drift_max"] < 1e-3 and runs[1]["clip_ratio"] == 0.0
    assert runs[3]["replay_drift_max"] > 1e-3 and runs[3]["clip_ratio"] > 0.0


def test_surrogate_metrics_average_over_the_steps_that_have_targets(make_model, special):
    """`jump_ce` is the mean over replayed steps whose jump has targets; the last steps of a block have none
    (nothing is committed later), and counting them as 0 once pulled the metric down."""
    from onpolicy.config import OnPolicyConfig
    from onpolicy.diffusion.policy import jump_distillation_loss
    from onpolicy.rollout import replay_step_logits
    from onpolicy.sampling import SamplerConfig, generate
    from onpolicy.trainers.onpolicy import Reference, jump_positions, micro_batch_loss

    model = make_model("block_causal", block_size=4)
    cfg = OnPolicyConfig()
    cfg.loss.surrogate, cfg.loss.commit_actions = "jump", False
    cfg.rollout.sampler = SamplerConfig(max_new_tokens=8, block_size=4, stop_at_eos=False)
    rows = [generate(model, [[5, 6, 7]], special, cfg.rollout.sampler, seeds=[0]).row(0)]
    with torch.no_grad():
        _, stats = micro_batch_loss(model, Reference(model, 0.0), rows, special, torch.zeros(1),
                                    torch.ones(1, dtype=torch.bool), torch.ones(1), cfg, 2,
                                    torch.device("cpu"))
        per_step = [jump_distillation_loss(st.logits, st.canvas, jump_positions(st, 2), torch.ones(1),
                                           0.0)[1]["jump_ce"]
                    for st in replay_step_logits(model, rows, special) if jump_positions(st, 2).any()]
    assert len(per_step) == 3  # four steps per block, the last has no later commit
    assert float(stats["jump_ce"]) == pytest.approx(float(sum(per_step)) / 3, rel=1e-5)
