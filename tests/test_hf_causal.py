"""An outside HF causal LM behind the one sampler: same tokens as transformers' own greedy decoding."""

import pytest
import torch

from onpolicy.sampling import SamplerConfig, generate


@pytest.fixture
def llama_folder(tmp_path):
    return make_llama_folder(tmp_path / "llama")


def make_llama_folder(folder):
    """A small random LlamaForCausalLM saved as an HF folder, with a tokenizer whose pad is its EOS
    (as SmolLM2's is) and without a mask token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["def add(a, b):\n    return a + b\n" * 20, "xs = [x * 2 for x in xs]\n" * 20],
                            trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_load_model_wraps_a_llama_folder_and_gives_it_its_own_pad(llama_folder):
    from onpolicy.hf_causal import CausalLMAdapter
    from onpolicy.loading import load_model
    from onpolicy.tokenizer import SpecialTokens

    model, tok = load_model(llama_folder)
    assert isinstance(model, CausalLMAdapter) and model.config.attention == "causal"
    special = SpecialTokens.from_tokenizer(tok)
    assert special.pad != special.eos  # padding is never predicted, EOS must stay predictable
    assert min(special.pad, special.mask, special.sep) >= model.lm_vocab  # added past the model's rows


def test_sampler_on_adapter_equals_transformers_greedy(llama_folder):
    from onpolicy.loading import load_model
    from onpolicy.tokenizer import SpecialTokens

    model, tok = load_model(llama_folder)
    special = SpecialTokens.from_tokenizer(tok)
    prompts = [tok("def add(a, b):\n", add_special_tokens=False)["input_ids"],
               tok("xs = [x", add_special_tokens=False)["input_ids"]]
    cfg = SamplerConfig(max_new_tokens=12, stop_at_eos=False)
    batch = generate(model, prompts, special, cfg)
    for prompt, got in zip(prompts, batch.tokens):
        ref = model.lm.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                pad_token_id=special.eos)[0, len(prompt):].tolist()
        assert got == ref  # left padding in the batch changes nothing, and each token cost one cached forward
        assert generate(model, [prompt], special, cfg).tokens[0] == got
    assert batch.forwards == 12


def test_tokens_the_model_never_saw_are_never_proposed(llama_folder):
    from onpolicy.loading import load_model

    model, tok = load_model(llama_folder)
    ids = torch.tensor([[len(tok) - 1, 5, 6]])  # an added special id in the input is fed as EOS, not an error
    logits = model(input_ids=ids).logits
    assert logits.shape[-1] == len(tok)
    assert (torch.isinf(logits[..., model.lm_vocab :]).all()
            and torch.isfinite(logits[..., : model.lm_vocab]).all())


def test_missing_outside_model_names_the_path(tmp_path):
    from onpolicy.hf_causal import load_causal_lm

    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_causal_lm(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_causal_lm(tmp_path / "missing.gguf")


def test_chat_prompt_and_code_extraction(llama_folder):
    from onpolicy.data.tasks import chat_prompt, extract_code
    from onpolicy.tokenizer import load_tokenizer

    reply = "Here it is:\n```python\ndef f(x):\n    return x + 1\n```\n\nThis adds one."
    assert extract_code(reply) == "def f(x):\n    return x + 1\n"
    assert extract_code("```\ndef f(x):\n    return 2") == "def f(x):\n    return 2"  # cut off mid-block
    assert extract_code("def f(x):\n    return 3\n") == "def f(x):\n    return 3\n"  # no fence: all of it
    tok = load_tokenizer(llama_folder)
    with pytest.raises(ValueError, match="chat template"):
        chat_prompt(tok, "def f(x):\n")
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    text = chat_prompt(tok, "def f(x):\n")
    assert text.startswith("<user>") and "```python\ndef f(x):\n```" in text and text.endswith("<assistant>")


def test_mbpp_test_split_is_the_papers():
    from verifiers import load_tasks

    tasks = load_tasks("mbpp-test")
    assert [int(t.task_id.split("/")[1]) for t in tasks] == list(range(11, 511))


def test_our_causal_model_converts_to_an_equal_llama(make_model):
    from onpolicy.convert import to_llama

    ours = make_model("causal", block_size=1)
    llama = to_llama(ours)
    x = torch.randint(5, 64, (2, 12))
    torch.testing.assert_close(llama(x).logits, ours(input_ids=x).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="only a causal"):
        to_llama(make_model("block_causal"))
