"""Starting from a real pretrained causal model: Llama- and Qwen2-architecture checkpoints map onto
DiffusionTransformer weight for weight (causal-mode logits equal), then continue as block diffusion."""

import pytest
import torch

from .conftest import run_cli


def _tokenizer():
    from onpolicy.data.generated import generate_tasks
    from onpolicy.tokenizer import train_tokenizer

    tasks = generate_tasks("train", 100)
    return train_tokenizer([t.prompt + t.canonical_solution for t in tasks], vocab_size=300)


def _save_outside_model(folder, kind, tok, tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    if kind == "llama":
        lm = LlamaForCausalLM(LlamaConfig(**common, rope_theta=50000.0))
    else:
        lm = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=50000.0))
        with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them matter
            for layer in lm.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return lm.eval()


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_outside_causal_model_maps_weight_for_weight(tmp_path, kind, tied):
    from onpolicy.loading import load_pretrained
    from onpolicy.sampling import SamplerConfig, generate
    from onpolicy.tokenizer import SpecialTokens

    tok = _tokenizer()
    lm = _save_outside_model(tmp_path / kind, kind, tok, tied)
    ours, tokenizer = load_pretrained(tmp_path / kind)  # converted: a DiffusionTransformer in causal mode
    assert type(ours).__name__ == "DiffusionTransformer" and ours.config.attention == "causal"
    assert ours.config.num_key_value_heads == 2 and ours.config.tie_word_embeddings == tied
    x = torch.randint(5, len(tok), (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # rows our tokenizer added (Qwen2's tokenizer class brings <|endoftext|>) come after
        theirs = lm(input_ids=x).logits
        torch.testing.assert_close(ours(input_ids=x).logits[..., : theirs.shape[-1]], theirs, rtol=0,
                                   atol=1e-5)
    # the KV cache with grouped-query attention: cached decoding = decoding without the cache
    special = SpecialTokens.from_tokenizer(tokenizer)
    prompts = [x[0, :7].tolist(), x[1, :12].tolist()]
    cached = generate(ours, prompts, special, SamplerConfig(max_new_tokens=10, stop_at_eos=False))
    plain = generate(ours, prompts, special,
                     SamplerConfig(max_new_tokens=10, stop_at_eos=False, use_cache=False))
    assert cached.tokens == plain.tokens


def test_unsupported_architectures_are_refused_by_name(tmp_path):
    from transformers import LlamaConfig

    from onpolicy.convert import diffusion_config_from
    from onpolicy.tokenizer import SpecialTokens

    special = SpecialTokens(pad=0, bos=1, eos=2, mask=3, sep=4, vocab_size=64)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="scaled RoPE"):
        diffusion_config_from(cfg, 64, special)
    cfg.model_type = "gpt2"
    with pytest.raises(ValueError, match="model_type 'gpt2' cannot be converted"):
        diffusion_config_from(cfg, 64, special)


@pytest.mark.slow
def test_a_llama_checkpoint_continues_as_block_diffusion(tmp_path, code_dir):
    from onpolicy.loading import load_pretrained
    from onpolicy.tokenizer import load_tokenizer, tokenizer_fingerprint

    tok = _tokenizer()
    _save_outside_model(tmp_path / "llama", "llama", tok)
    out = tmp_path / "run"
    r = run_cli("train", "recipes/tiny/adapt_smollm2.yaml", f"model.init_from={tmp_path / 'llama'}",
                f"data.source={code_dir}", "data.seq_len=64", "model.block_size=8", "train.max_steps=3",
                "train.micro_batch_size=4", "train.eval_batches=2", f"data.cache_dir={tmp_path / 'cache'}",
                f"logging.output_dir={out}", "logging.progress=false")
    assert r.returncode == 0, r.stderr[-3000:]
    model, _ = load_pretrained(out / "final")
    assert (model.config.attention == "block_causal" and model.config.shift_logits
            and model.config.num_key_value_heads == 2)
    fingerprint = lambda folder: tokenizer_fingerprint(load_tokenizer(folder))  # noqa: E731
    assert fingerprint(out / "final") == fingerprint(tmp_path / "llama")
