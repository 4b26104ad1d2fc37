import pytest
import torch

from onpolicy.sampling import (
    SamplerConfig,
    _commit_mask,
    _propose,
    generate,
    prefill_groups,
    proposal_logits,
    replay_states,
)

PROMPTS = [[10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [30], [40, 41, 42, 43, 44]]


@pytest.fixture
def peaked(make_model):
    # larger init: confident, well-separated logits, so greedy choices are not near-ties
    return lambda attention, block_size=4: make_model(attention, block_size=block_size, initializer_range=0.3)


@pytest.mark.parametrize("attention,block", [("block_causal", 4), ("block_causal", 32), ("causal", 1)])
@pytest.mark.parametrize("batch", [1, 4])
def test_cache_and_no_cache_are_token_identical(peaked, special, attention, block, batch):
    model = peaked(attention, block_size=block)
    prompts = PROMPTS[:batch]
    cfg = SamplerConfig(max_new_tokens=40, stop_at_eos=False)
    with_cache = generate(model, prompts, special, cfg)
    without = generate(model, prompts, special,
                       SamplerConfig(max_new_tokens=40, stop_at_eos=False, use_cache=False))
    assert with_cache.tokens == without.tokens
    assert all(len(t) == 40 for t in with_cache.tokens)


@pytest.mark.parametrize("attention", ["block_causal", "causal", "bidirectional"])
def test_batch_equals_each_sequence_alone(peaked, special, attention):
    model = peaked(attention)
    cfg = SamplerConfig(max_new_tokens=12, stop_at_eos=False)
    batched = generate(model, PROMPTS, special, cfg).tokens
    alone = [generate(model, [p], special, cfg).tokens[0] for p in PROMPTS]
    assert batched == alone


def test_block_size_one_on_causal_model_is_greedy_next_token(peaked, special):
    model = peaked("causal")
    prompt = PROMPTS[1]
    traj = generate(model, [prompt], special, SamplerConfig(max_new_tokens=10, stop_at_eos=False))
    ids = list(prompt)
    for _ in range(10):  # plain greedy decoding, no cache, no sampler
        logits = model(torch.tensor([ids])).logits[0, -1].clone()
        logits[[special.mask, special.pad]] = -float("inf")
        ids.append(int(logits.argmax()))
    assert traj.tokens[0] == ids[len(prompt):]
    assert traj.forwards == 10  # one forward per token: the prompt, then 9 cached steps
    assert traj.commit_forward[0].tolist() == list(range(1, 11))


def test_steps_per_block_and_threshold_control_parallelism(peaked, special):
    model = peaked("block_causal", block_size=8)
    one = generate(model, [PROMPTS[0]], special, SamplerConfig(max_new_tokens=16, stop_at_eos=False))
    two = generate(model, [PROMPTS[0]], special,
                   SamplerConfig(max_new_tokens=16, steps_per_block=2, stop_at_eos=False))
    # 8 steps per block x 2 blocks: the prompt and the finished block enter the cache in the forward
    # of the next block's first step, so no forward is spent on cache writes
    assert one.forwards == 16 and one.row_forwards == [16]
    assert two.forwards == 4
    assert sorted(set(two.commit_forward[0].tolist())) == [1, 2, 3, 4]  # 4 tokens committed per step
    loose = generate(model, [PROMPTS[0]], special,
                     SamplerConfig(max_new_tokens=16, threshold=0.0, stop_at_eos=False))
    # everything above threshold 0: one step per block
    assert loose.forwards == 2 and loose.tokens_per_forward == 8.0


def test_commit_mask_rules():
    conf = torch.tensor([[0.9, 0.2, 0.6, 0.95], [0.1, 0.3, 0.2, 0.4]])
    open_ = torch.tensor([[True, True, True, False], [True, True, True, True]])
    # threshold: everything open above it, at least the best one per row
    got = _commit_mask(conf, open_, n_steps_left=4, threshold=0.5)
    assert got.tolist() == [[True, False, True, False], [False, False, False, True]]
    # fixed steps: ceil(open / steps_left) most confident
    got = _commit_mask(conf, open_, n_steps_left=2, threshold=None)
    assert got.tolist() == [[True, False, True, False], [False, True, False, True]]


def test_stops_at_eos_and_cuts_output(special, make_model):
    model = make_model("block_causal", block_size=4)

    class AlwaysEOS(torch.nn.Module):
        def forward(self, h):
            logits = torch.zeros(*h.shape[:-1], special.vocab_size)
            logits[..., special.eos] = 10.0
            return logits

    model.lm_head = AlwaysEOS()
    traj = generate(model, [PROMPTS[0]], special, SamplerConfig(max_new_tokens=32))
    assert traj.tokens == [[]] and traj.finished == [True]
    assert traj.forwards == 4  # one block of 4 steps (the prompt rides in the first); no further blocks
    assert traj.row_lengths == [4] and traj.row(0).canvas.tolist() == [special.eos] * 4


def test_self_correction_reopens_and_terminates(peaked, special):
    model = peaked("block_causal", block_size=8)
    base = SamplerConfig(max_new_tokens=16, stop_at_eos=False, steps_per_block=2)
    plain = generate(model, PROMPTS, special, base)
    assert plain.remasked == 0
    # a threshold no probability reaches: every committed token the model would now change is re-opened
    eager = generate(model, PROMPTS, special,
                     SamplerConfig(**{**base.__dict__, "remask_threshold": 1.01, "max_steps_per_block": 6}))
    assert eager.remasked > 0
    assert all(len(t) == 16 for t in eager.tokens) and 3 not in sum(eager.tokens, [])  # no MASK left behind
    assert eager.forwards <= 2 * 6  # the step budget bounds it
    with pytest.raises(ValueError, match="self-correction"):
        replay_states(eager.row(0), special.mask)  # re-opened tokens: no exact replay, and it says so
    # a threshold nothing falls below changes no token (it costs one checking forward per block)
    never = generate(model, PROMPTS, special, SamplerConfig(**{**base.__dict__, "remask_threshold": 0.0}))
    assert never.tokens == plain.tokens and never.remasked == 0


def test_top_k_one_is_greedy_and_timing_is_recorded(peaked, special):
    model = peaked("block_causal")
    greedy = generate(model, PROMPTS, special, SamplerConfig(max_new_tokens=8, stop_at_eos=False))
    top1 = generate(model, PROMPTS, special,
                    SamplerConfig(max_new_tokens=8, stop_at_eos=False, temperature=1.0, top_k=1))
    assert top1.tokens == greedy.tokens
    nucleus = generate(model, PROMPTS, special,
                       SamplerConfig(max_new_tokens=8, stop_at_eos=False, temperature=1.0, top_p=1e-6))
    assert nucleus.tokens == greedy.tokens
    assert greedy.seconds >= greedy.model_seconds > 0 and 0 <= greedy.overhead_fraction < 1


def test_record_states_are_the_states_before_each_step(peaked, special):
    model = peaked("block_causal", block_size=4)
    traj = generate(model, [PROMPTS[0]], special,
                    SamplerConfig(max_new_tokens=8, stop_at_eos=False, steps_per_block=2), record_states=True)
    assert len(traj.states) == 4  # 2 steps x 2 blocks
    masked = [int((canvas == special.mask).sum()) for canvas, _, _ in traj.states]
    assert masked == [8, 6, 4, 2]
    assert traj.canvas[0].tolist() == traj.tokens[0]


def test_sampler_leaves_the_callers_logits_alone(special):
    logits = torch.randn(2, 4, special.vocab_size)
    before = logits.clone()
    token, conf, logp, _ = _propose(proposal_logits(logits, special).log_softmax(-1), SamplerConfig(),
                                    [None, None],
                                 torch.ones(2, dtype=torch.bool))
    assert torch.equal(logits, before)
    assert not (token == special.mask).any() and torch.allclose(conf, logp.exp())


SETTINGS = [dict(), dict(threshold=0.3), dict(steps_per_block=2), dict(temperature=1.0, threshold=0.5),
            dict(temperature=0.8, top_k=5)]


@pytest.mark.parametrize("attention,block",
                         [("block_causal", 1), ("block_causal", 4), ("block_causal", 32), ("causal", 1),
                                             ("bidirectional", 8)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_replay_matches_the_sampler_exactly(peaked, special, attention, block, use_cache):
    """Replayed logits equal the sampler's own at every step (1e-5), batch 1 and 4; replay_states
    equals the recorded states; each row decodes the same alone as in its batch, sampled or greedy."""
    from onpolicy.rollout import replay_logprobs, replay_step_logits

    model = peaked(attention, block_size=block)
    for setting in SETTINGS:
        cfg = SamplerConfig(max_new_tokens=24, block_size=block, use_cache=use_cache, **setting)
        for prompts, seeds in ((PROMPTS[:1], [7]), (PROMPTS, [7, 8, 9, 10])):
            traj = generate(model, prompts, special, cfg, seeds=seeds, record_states=True)
            rows = [traj.row(i) for i in range(len(prompts))]
            # the sampler's logits at each row's steps, in order
            seen = [[logits[i] for _, stepped, logits in traj.states if stepped[i]]
                    for i in range(len(prompts))]
            for i, row in enumerate(rows):
                recorded = [canvas[i, : traj.row_lengths[i]] for canvas, stepped, _ in traj.states
                            if stepped[i]]
                replayed = replay_states(row, special.mask)
                # every forward of a row is one of its steps
                assert len(replayed) == len(recorded) == row.forwards
                assert all(torch.equal(a, b) for a, b in zip(replayed, recorded))
            # replay: for every committed position, the logits of the step that committed it [B, G, V]
            at_commit = sum(torch.where(st.now[..., None], st.logits, 0.0)
                            for st in replay_step_logits(model, rows, special))
            for i, row in enumerate(rows):
                steps = row.commit_forward[row.commit_forward > 0].unique().tolist()
                for k, f in enumerate(steps):
                    where = (row.commit_forward == f).nonzero().flatten()
                    # the block's logits at that step
                    sampler = proposal_logits(seen[i][k], special)[where % block]
                    assert torch.allclose(at_commit[i, where], sampler, atol=1e-5), (setting, i, k)
            logp, committed = replay_logprobs(model, rows, special)
            for i, row in enumerate(rows):
                n = len(row.canvas)
                assert torch.equal(committed[i, :n], row.commit_forward > 0)
                assert torch.allclose(logp[i, :n], row.commit_logprob, atol=1e-5)
            if len(prompts) > 1:  # a row is the same alone as in its batch
                for i, p in enumerate(prompts):
                    alone = generate(model, [p], special, cfg, seeds=[seeds[i]])
                    assert alone.tokens[0] == traj.tokens[i] and alone.row_forwards[0] == traj.row_forwards[i]


def test_sampled_states_are_replayed_states(peaked, special):
    """replay_sampled_states: one state per block, drawn within that block's own steps and reproducible from
    the generator's seed; each block's logits there equal replay_step_logits' at that step (1e-5); over
    draws every step of every block comes up."""
    from onpolicy.rollout import replay_sampled_states, replay_step_logits

    block = 4
    model = peaked("block_causal", block_size=block)
    cfg = SamplerConfig(max_new_tokens=24, block_size=block, threshold=0.5, temperature=1.0)
    rows = [generate(model, PROMPTS, special, cfg, seeds=[1, 2, 3, 4]).row(i) for i in range(len(PROMPTS))]
    every = list(replay_step_logits(model, rows, special))
    steps = every[0].step_index.view(len(rows), -1, block)
    n_steps = steps.max(-1).values + 1  # [B, n_blocks]
    assert n_steps.max() > 1  # blocks of several steps, or the draw is trivial
    drawn = set()
    for seed in range(40):
        st = replay_sampled_states(model, rows, special, torch.Generator().manual_seed(seed))
        j = st.index.view(len(rows), -1, block)
        assert (j == j[..., :1]).all() and torch.equal(st.now, st.step_index == st.index)
        j = j[..., 0]
        assert ((j >= 0) & ((j < n_steps) | (n_steps == 0))).all()
        for i, b in (n_steps > 0).nonzero().tolist():
            at = slice(b * block, (b + 1) * block)
            assert torch.allclose(st.logits[i, at], every[int(j[i, b])].logits[i, at],
                                  atol=1e-5), (seed, i, b)
            drawn.add((i, b, int(j[i, b])))
    assert drawn == {(i, b, k) for i, b in (n_steps > 0).nonzero().tolist()
                     for k in range(int(n_steps[i, b]))}
    again = replay_sampled_states(model, rows, special, torch.Generator().manual_seed(39))
    assert torch.equal(again.index, st.index)
    with pytest.raises(ValueError, match="block_causal"):
        replay_sampled_states(peaked("causal", block_size=1), rows, special, torch.Generator())


def test_replay_logprobs_carry_gradient(peaked, special):
    from onpolicy.rollout import replay_logprobs

    model = peaked("block_causal", block_size=4)
    traj = generate(model, PROMPTS, special, SamplerConfig(max_new_tokens=12, threshold=0.5, temperature=1.0))
    logp, committed = replay_logprobs(model, [traj.row(i) for i in range(4)], special)
    (-(logp * committed).sum()).backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


ROW_SETTINGS = [{}, {"threshold": 0.15}, {"threshold": 0.05, "temperature": 1.0},
                {"threshold": 0.1, "commit_temperature": 0.05},
                {"steps_per_block": 2, "temperature": 0.8, "top_k": 5}]


def _same_rows(a, b, rows=None):
    """Two trajectories decoded the same rows identically: tokens, forwards and every commit."""
    for i, j in enumerate(rows or range(len(a.tokens))):
        ra, rb = a.row(i), b.row(j)
        assert ra.tokens == rb.tokens and ra.forwards == rb.forwards and ra.finished == rb.finished, (i, j)
        assert torch.equal(ra.canvas, rb.canvas) and torch.equal(ra.commit_forward, rb.commit_forward), (i, j)
        torch.testing.assert_close(ra.commit_logprob, rb.commit_logprob, rtol=0, atol=1e-5)
        if ra.behaviour_logprob is not None:
            torch.testing.assert_close(ra.behaviour_logprob, rb.behaviour_logprob, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention,block,shift",
                         [("block_causal", 4, False), ("block_causal", 4, True), ("causal", 1, False)])
def test_per_row_decoding_equals_lock_step_alone_and_uncached(make_model, special, attention, block, shift):
    """Per-row decoding (each row at its own block, done rows leave, waiting rows take their slots)
    gives every row of a batch of 16 the same tokens, forwards and commits as the lock-step loop, as the
    uncached loop and as decoding the row alone (greedy, thresholded, sampled, soft commits), while
    running fewer forwards than lock-step; the trajectories replay exactly. With and without shift_logits
    (a block's first token reads the row's cached last logits, the head runs on the block only)."""
    from onpolicy.rollout import replay_logprobs

    # shift: as the main job's models
    model = make_model(attention, block_size=block, initializer_range=0.3, shift_logits=shift)
    model.lm_head.weight.data[special.eos] *= 2.5  # EOS comes at different points, so rows finish apart
    g = torch.Generator().manual_seed(0)
    # long ones: prefill groups
    sizes = torch.cat([torch.randint(1, 10, (12,), generator=g), torch.randint(90, 110, (4,), generator=g)])
    prompts = [torch.randint(5, special.vocab_size, (int(n),), generator=g).tolist() for n in sizes]
    seeds = list(range(100, 116))
    extra = len(prefill_groups(sorted(map(len, prompts)), block)) - 1  # the batch's first forward runs as
    # this many more
    assert extra > 0
    fewer = apart = 0
    for setting in ROW_SETTINGS:
        cfg = SamplerConfig(max_new_tokens=24, **setting)
        per_row = generate(model, prompts, special, cfg, seeds=seeds)
        # batch 16
        lock = generate(model, prompts, special, SamplerConfig(max_new_tokens=24, per_row=False, **setting),
                        seeds=seeds)
        uncached = generate(model, prompts, special,
                            SamplerConfig(max_new_tokens=24, use_cache=False, **setting), seeds=seeds)
        refilled = generate(model, prompts, special, cfg, seeds=seeds, slots=5)
        apart += 0 < sum(per_row.finished) < len(prompts)  # some rows finish (and leave) before others
        for other in (lock, uncached, refilled):
            _same_rows(per_row, other)
        lock_cfg = SamplerConfig(max_new_tokens=24, per_row=False, **setting)
        for i in (0, 7, 15):  # batch 1: per-row alone = lock-step alone = the row in its batch of 16
            alone = generate(model, [prompts[i]], special, cfg, seeds=[seeds[i]])
            _same_rows(alone, generate(model, [prompts[i]], special, lock_cfg, seeds=[seeds[i]]))
            _same_rows(alone, per_row, [i])
        assert per_row.forwards - extra <= lock.forwards
        fewer += per_row.forwards - extra < lock.forwards
        if attention == "block_causal":
            rows = [per_row.row(i) for i in range(16)]
            logp, committed = replay_logprobs(model, rows, special)
            for i, row in enumerate(rows):
                assert torch.equal(committed[i, : len(row.canvas)], row.commit_forward > 0)
                torch.testing.assert_close(logp[i, : len(row.canvas)], row.commit_logprob, rtol=0, atol=1e-5)
    assert apart >= 2
    # lock-step waits for each block's slowest row, per-row does not (a causal model's
    # rows step together anyway)
    assert fewer >= 3 if attention == "block_causal" else fewer == 0


def test_prefill_groups_split_where_padding_costs_more_than_a_forward():
    from onpolicy.sampling import PREFILL_FORWARD_TOKENS

    assert prefill_groups([50] * 8, 8) == [slice(0, 8)]  # no padding: one forward
    # 8 x 90 padded tokens > one forward
    assert prefill_groups([10] * 8 + [100] * 8, 8) == [slice(0, 8), slice(8, 16)]
    small_gap = 1 + PREFILL_FORWARD_TOKENS // 16  # 8 rows x a small gap < one forward's cost: one group
    assert prefill_groups([10] * 8 + [10 + small_gap] * 8, 8) == [slice(0, 16)]
    assert prefill_groups([], 8) == [] and prefill_groups([3], 8) == [slice(0, 1)]
