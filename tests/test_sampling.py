import pytest
import torch

from onpolicy.sampling import SamplerConfig, _commit_mask, generate

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
    without = generate(model, prompts, special, SamplerConfig(max_new_tokens=40, stop_at_eos=False, use_cache=False))
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
    assert traj.commit_step[0] == list(range(1, 11))


def test_steps_per_block_and_threshold_control_parallelism(peaked, special):
    model = peaked("block_causal", block_size=8)
    one = generate(model, [PROMPTS[0]], special, SamplerConfig(max_new_tokens=16, stop_at_eos=False))
    two = generate(model, [PROMPTS[0]], special, SamplerConfig(max_new_tokens=16, steps_per_block=2, stop_at_eos=False))
    # prompt forward + 8 steps per block x 2 blocks + 1 cache write between the blocks
    assert one.forwards == 1 + 16 + 1
    assert two.forwards == 1 + 4 + 1
    assert sorted(set(two.commit_step[0])) == [2, 3, 5, 6]  # 4 tokens committed per step
    loose = generate(model, [PROMPTS[0]], special, SamplerConfig(max_new_tokens=16, threshold=0.0, stop_at_eos=False))
    assert loose.forwards == 1 + 2 + 1  # everything above threshold 0: one step per block


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
    assert traj.forwards == 1 + 4  # the prompt, then one block of 4 steps; no further blocks


def test_self_correction_reopens_and_terminates(peaked, special):
    model = peaked("block_causal", block_size=8)
    base = SamplerConfig(max_new_tokens=16, stop_at_eos=False, steps_per_block=2)
    plain = generate(model, PROMPTS, special, base)
    assert plain.remasked == 0
    # a threshold no probability reaches: every committed token the model would now change is re-opened
    eager = generate(model, PROMPTS, special, SamplerConfig(**{**base.__dict__, "remask_threshold": 1.01, "max_steps_per_block": 6}))
    assert eager.remasked > 0
    assert all(len(t) == 16 for t in eager.tokens) and 3 not in sum(eager.tokens, [])  # no MASK left behind
    assert eager.forwards <= 1 + 2 * 6 + 1  # the step budget bounds it
    # a threshold nothing falls below changes no token (it costs one checking forward per block)
    never = generate(model, PROMPTS, special, SamplerConfig(**{**base.__dict__, "remask_threshold": 0.0}))
    assert never.tokens == plain.tokens and never.remasked == 0


def test_top_k_one_is_greedy_and_timing_is_recorded(peaked, special):
    model = peaked("block_causal")
    greedy = generate(model, PROMPTS, special, SamplerConfig(max_new_tokens=8, stop_at_eos=False))
    top1 = generate(model, PROMPTS, special, SamplerConfig(max_new_tokens=8, stop_at_eos=False, temperature=1.0, top_k=1),
                    generator=torch.Generator().manual_seed(0))
    assert top1.tokens == greedy.tokens
    nucleus = generate(model, PROMPTS, special, SamplerConfig(max_new_tokens=8, stop_at_eos=False, temperature=1.0, top_p=1e-6),
                       generator=torch.Generator().manual_seed(0))
    assert nucleus.tokens == greedy.tokens
    assert greedy.seconds >= greedy.model_seconds > 0 and 0 <= greedy.overhead_fraction < 1


def test_record_states_replays_commits(peaked, special):
    model = peaked("block_causal", block_size=4)
    traj = generate(model, [PROMPTS[0]], special, SamplerConfig(max_new_tokens=8, stop_at_eos=False, steps_per_block=2), record_states=True)
    assert len(traj.states) == 4  # 2 steps x 2 blocks
    masked = [int((s == special.mask).sum()) for s in traj.states]
    assert masked == [6, 4, 2, 0]
    assert traj.states[-1][0].tolist() == traj.tokens[0]
