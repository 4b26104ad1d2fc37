import pytest
import torch
from transformers import AutoModel

import onpolicy.model  # noqa: F401  (registers the Auto classes)
from onpolicy.model import attention_allowed


def rand_ids(b, n, seed=0, low=5, high=64):
    return torch.randint(low, high, (b, n), generator=torch.Generator().manual_seed(seed))


def test_block_causal_later_block_never_changes_earlier(make_model):
    model = make_model("block_causal", block_size=4)
    x = rand_ids(2, 12)
    y = x.clone()
    y[:, 8:] = rand_ids(2, 4, seed=1)  # change only the third block
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    # ...but a change inside a block is seen by the whole block (bidirectional inside)
    z = x.clone()
    z[:, 7] = (z[:, 7] + 1) % 64
    assert not torch.allclose(model(z).logits[:, 4], a[:, 4])


def test_causal_and_bidirectional_masks(make_model):
    x = rand_ids(1, 10)
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % 64
    causal = make_model("causal")
    torch.testing.assert_close(causal(x).logits[:, :6], causal(y).logits[:, :6], rtol=0, atol=0)
    bidir = make_model("bidirectional")
    assert not torch.allclose(bidir(x).logits[:, 0], bidir(y).logits[:, 0])


def test_bd3_training_mask_reads_clean_earlier_blocks_only(make_model):
    model = make_model("block_causal", block_size=4)
    x0 = rand_ids(1, 12)
    x_t = x0.clone()
    x_t[:, ::2] = 3
    base = model(x_t, clean_input_ids=x0).logits
    assert base.shape == (1, 12, 64)
    # a noisy block must not see later clean blocks ...
    x0b = x0.clone()
    x0b[:, 8:] = rand_ids(1, 4, seed=5)
    torch.testing.assert_close(model(x_t, clean_input_ids=x0b).logits[:, :8], base[:, :8], rtol=0, atol=0)
    # ... nor noisy tokens of earlier blocks (it reads their clean version)
    x_tb = x_t.clone()
    x_tb[:, 1] = 7
    torch.testing.assert_close(model(x_tb, clean_input_ids=x0).logits[:, 4:], base[:, 4:], rtol=0, atol=0)
    # and x_t == x0 is the plain block-causal forward
    torch.testing.assert_close(model(x0, clean_input_ids=x0).logits, model(x0).logits, rtol=1e-5, atol=1e-5)


def test_attention_allowed_bd3_pattern():
    # 2 blocks of 2; noisy half then clean half (BD3-LM's M_full)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    blk = pos // 2
    noisy = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    allowed = attention_allowed("block_causal", pos, pos, blk, blk, torch.ones_like(noisy), noisy,
                                noisy)[0, 0].int()
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ])
    assert torch.equal(allowed, expected)


@pytest.mark.parametrize("attention", ["block_causal", "causal", "bidirectional"])
def test_padding_does_not_change_outputs(make_model, attention):
    model = make_model(attention, block_size=4)
    x = rand_ids(1, 7)
    ref = model(x).logits
    # right padding, masked out
    padded = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], 1)
    valid = torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], 1)
    torch.testing.assert_close(model(padded, attention_mask=valid).logits[:, :7], ref, rtol=1e-5, atol=1e-5)
    # left padding: positions skip the pads
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    valid = torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], 1)
    out = model(padded, attention_mask=valid).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3:], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["block_causal", "causal"])
def test_kv_cache_matches_full_forward(make_model, attention):
    model = make_model(attention, block_size=4)
    x = rand_ids(3, 12)
    full = model(x).logits
    cache = model(x[:, :8], use_cache=True).past_key_values
    assert cache.length == 8
    torch.testing.assert_close(model(x[:, 8:], past_key_values=cache).logits, full[:, 8:], rtol=1e-5,
                               atol=1e-5)
    # the input cache is not modified, and appending more continues correctly
    assert cache.length == 8
    cache2 = model(x[:, 8:10], past_key_values=cache, use_cache=True).past_key_values
    assert cache2.length == 10


def test_save_load_identical_logits(make_model, tmp_path):
    model = make_model("block_causal")
    x = rand_ids(2, 8)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.config.attention == "block_causal" and loaded.config.block_size == 4
    torch.testing.assert_close(loaded.eval()(x).logits, model(x).logits, rtol=0, atol=0)


def test_peft_lora_wraps_and_roundtrips(make_model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = make_model("block_causal")
    x = rand_ids(1, 8)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in lora.parameters()) / 10
    out = lora(input_ids=x).logits
    lora.save_pretrained(tmp_path)
    fresh = PeftModel.from_pretrained(make_model("block_causal"), tmp_path).eval()
    torch.testing.assert_close(fresh(input_ids=x).logits, out, rtol=1e-5, atol=1e-5)


def test_shifted_diffusion_from_ar_weights_starts_as_the_ar_model(make_model):
    """shift_logits (Dream's AR-to-diffusion adaptation): with block size 1, every noisy token is a
    block start read from the clean token before it, so the converted model's training logits are
    exactly the AR model's next-token logits: nothing the AR model learned is lost at the switch."""
    ar = make_model(attention="causal", seed=3)
    diff = make_model(attention="block_causal", block_size=1, seed=4, shift_logits=True)
    diff.load_state_dict(ar.state_dict())
    x0 = torch.randint(5, 64, (2, 12))
    noisy = x0.clone()
    noisy[:, 1:] = 3  # every position but the first masked
    got = diff(input_ids=noisy, clean_input_ids=x0).logits
    want = ar(input_ids=x0).logits
    torch.testing.assert_close(got[:, 1:], want[:, :-1])


@pytest.mark.parametrize("block", [1, 4])
def test_shifted_model_cache_equals_full_forward(make_model, special, block):
    from onpolicy.sampling import SamplerConfig, generate

    model = make_model(attention="block_causal", block_size=block, seed=5, shift_logits=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    cfg = SamplerConfig(max_new_tokens=12, stop_at_eos=False)
    cached = generate(model, prompts, special, cfg)
    full = generate(model, prompts, special,
                    SamplerConfig(max_new_tokens=12, stop_at_eos=False, use_cache=False))
    assert cached.tokens == full.tokens
    alone = generate(model, prompts[1:], special, cfg)
    assert alone.tokens[0] == cached.tokens[1]


def test_config_knows_the_models_attention_options():
    from onpolicy import config, model

    assert (config.ATTENTION_MODES == model.ATTENTION_MODES
            and config.ATTENTION_KERNELS == model.ATTENTION_KERNELS)


@pytest.mark.parametrize("attention", ["block_causal", "causal", "bidirectional"])
def test_flex_block_mask_equals_the_dense_mask_path(make_model, special, attention):
    """The flex_attention path (GPU's kernel; eager here, where torch has no flex backward) gives the
    SDPA path's logits, for BD3 training (clean copy appended) and with padding."""
    model = make_model(attention=attention, block_size=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, special.vocab_size, (2, 12), generator=g)
    clean = torch.randint(5, special.vocab_size, (2, 12), generator=g)
    pad = torch.ones(2, 12, dtype=torch.long)
    pad[1, :3] = 0  # left padding in the second row
    kwargs = {"attention_mask": pad}
    if attention == "block_causal":
        kwargs["clean_input_ids"] = clean
    logits = {}
    with torch.no_grad():
        for kernel in ("sdpa", "flex"):
            model.config.attention_kernel = kernel
            logits[kernel] = model(ids, **kwargs).logits
    real = pad.bool()
    torch.testing.assert_close(logits["flex"][real], logits["sdpa"][real], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_same_gradients(make_model, special):
    model = make_model(attention="block_causal", block_size=4).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, special.vocab_size, (2, 16), generator=g)
    clean = torch.randint(5, special.vocab_size, (2, 16), generator=g)
    grads = []
    for recompute in (False, True):
        model.gradient_checkpointing = recompute
        model.zero_grad()
        model(ids, clean_input_ids=clean).logits.logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and transformers' own switch reaches it
    model.gradient_checkpointing = False
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    assert model.gradient_checkpointing


def test_one_token_cpu_decode_path_matches_linear_and_follows_the_weight():
    from onpolicy.model import Linear

    torch.manual_seed(0)
    lin = Linear(16, 48, bias=True)
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        fast = lin(x)  # one row, wide weight, no grad: the transposed layout
        assert lin._decode_weight is not None
        torch.testing.assert_close(fast, torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=0,
                                   atol=1e-6)
        lin.weight.mul_(2.0)  # an in-place update (an optimizer step, a load) refreshes the copy
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=0,
                                   atol=1e-6)
    out = lin(x)  # with gradient: the ordinary path, and gradients flow to the weight
    out.sum().backward()
    assert lin.weight.grad is not None and out.grad_fn is not None
    assert set(lin.state_dict()) == {"weight", "bias"}  # a plain nn.Linear to checkpoints and PEFT


@pytest.mark.parametrize("attention,shift",
                         [("block_causal", True), ("block_causal", False), ("bidirectional", True)])
def test_packed_logits_give_the_full_loss_and_gradient(make_model, special, attention, shift):
    """Stage 1 with the head only at the masked positions (`logits_at`, packed [M, V]) gives the same
    loss, stats and gradients (1e-5) as the full [B, L, V] logits it replaces."""
    from onpolicy.config import DiffusionConfig
    from onpolicy.diffusion.losses import masked_diffusion_loss
    from onpolicy.trainers.pretrain import stage1_loss

    model = make_model(attention, block_size=4, shift_logits=shift).train()
    x0 = torch.randint(5, special.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    packed, stats = stage1_loss(model, x0, DiffusionConfig(), special.mask, torch.Generator().manual_seed(1))
    packed.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    # the same noise, the full logits
    from onpolicy.diffusion.corruption import mask_tokens
    from onpolicy.diffusion.schedules import elbo_weight, mask_rate, sample_times

    gen, diff = torch.Generator().manual_seed(1), DiffusionConfig()
    t = sample_times(3, diff.t_sampling, diff.t_eps, gen)
    x_t, masked = mask_tokens(x0, mask_rate(t, diff.schedule), special.mask, generator=gen)
    assert masked.any() and not masked.all()
    clean = {"clean_input_ids": x0} if attention == "block_causal" else {}
    full = model(input_ids=x_t, **clean).logits
    assert full.shape == (3, 16, special.vocab_size)
    loss, full_stats = masked_diffusion_loss(full, x0, masked, elbo_weight(t, diff.schedule))
    loss.backward()
    torch.testing.assert_close(packed, loss, rtol=0, atol=1e-5)
    for k in stats:
        torch.testing.assert_close(stats[k], full_stats[k], rtol=0, atol=1e-5)
    for a, b in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model(input_ids=x_t, logits_at=masked, **clean).logits, full[masked], rtol=0,
                               atol=1e-5)
