"""Causal LMs of many architectures, served with no file of their own (the generic decoder family), each through
real servers on 127.0.0.1 against the local Hugging Face model: logits within 1e-4, the same tokens.

Each model is tiny and random, with a sliding window shorter than the prompts where the architecture has one,
and is cut into a one-block server and a server holding the rest (a boundary inside its sliding/full pattern).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModel
from swarm.errors import UnsupportedModelError
from tests.conftest import ATOL, assert_padded_batch_matches, assert_same_generation, generate_both, served_model
from tests.test_server import run_server_cli

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LAYERS = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
WINDOW = 5  # sliding window, shorter than every prompt below
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
# model type -> (config class, settings): every architecture issue 12 names besides Llama (tests/test_llama.py)
# and Mixtral (tests/test_mixtral.py)
ARCHITECTURES = {
    "qwen2": ("Qwen2Config", {**LAYERS, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2}),
    "qwen3": ("Qwen3Config", {**LAYERS, "head_dim": 16, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "mistral": ("MistralConfig", {**LAYERS, "sliding_window": WINDOW}),
    "gemma": ("GemmaConfig", {**LAYERS, "head_dim": 12}),
    "gemma2": ("Gemma2Config", {**LAYERS, "head_dim": 12, "sliding_window": WINDOW, "query_pre_attn_scalar": 12,
                                "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
    "gemma3_text": ("Gemma3TextConfig", {**LAYERS, "head_dim": 12, "sliding_window": WINDOW, "query_pre_attn_scalar": 12,
                                         "layer_types": ALTERNATING, "rope_parameters": {
                                             "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}}),
    "phi3": ("Phi3Config", {**LAYERS, "sliding_window": WINDOW}),
    "olmo2": ("Olmo2Config", LAYERS),
    "granite": ("GraniteConfig", {**LAYERS, "embedding_multiplier": 3.0, "logits_scaling": 0.5, "residual_multiplier": 0.8,
                                  "attention_multiplier": 0.3}),
    "starcoder2": ("Starcoder2Config", {**LAYERS, "sliding_window": WINDOW}),
    "cohere": ("CohereConfig", {**LAYERS, "logit_scale": 0.5, "use_qk_norm": True}),
    "gpt2": ("GPT2Config", dict(n_embd=48, n_layer=4, n_head=4, n_positions=256)),
    "gpt_bigcode": ("GPTBigCodeConfig", dict(n_embd=48, n_layer=4, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=48, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4)),
    "falcon": ("FalconConfig", dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4)),
    "falcon-alibi": ("FalconConfig", dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, alibi=True)),
    "opt": ("OPTConfig", dict(hidden_size=48, ffn_dim=72, num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=32)),
    "bloom": ("BloomConfig", dict(hidden_size=48, n_layer=4, n_head=4)),
}  # fmt: skip
SPANS = ["0:1", "1:4"]


def make_model(directory, name: str, **overrides):
    """Saves a seeded random model of architecture `name` (with `overrides` of its config), scaled so that greedy
    decoding varies its tokens."""
    config_class, settings = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**{**COMMON, **settings, **overrides})
    config.initializer_range = config.init_std = 0.2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(directory)
    return directory


def random_ids(batch, length, seed):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def served(request, tmp_path_factory, bootstrap_peers):
    """(distributed model, local model) of one architecture, served by two servers."""
    directory = make_model(tmp_path_factory.mktemp("models") / f"tiny-{request.param}", request.param)
    local = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with served_model(directory, SPANS, bootstrap_peers, tmp_path_factory.mktemp("logs")) as model:
        yield model, local


def test_logits_and_greedy_tokens_match_local(served):
    model, local = served
    input_ids = random_ids(1, 12, seed=1)
    assert type(model).__name__ == type(local).__name__ and isinstance(model, type(local))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, local(input_ids).logits, atol=ATOL, rtol=0)
    remote, expected = generate_both(model, local, input_ids, max_new_tokens=10, min_new_tokens=10)
    assert_same_generation(remote, expected)
    assert len(set(remote.sequences[0, 12:].tolist())) > 2, "the test model should not repeat one token"


def test_seeded_sampling_matches_local(served):
    model, local = served
    input_ids = random_ids(2, 7, seed=2)
    settings = dict(do_sample=True, temperature=0.9, top_k=30, max_new_tokens=9, min_new_tokens=9)
    torch.manual_seed(3)
    remote = model.generate(input_ids, **settings)
    torch.manual_seed(3)
    assert torch.equal(remote, local.generate(input_ids, **settings))


def test_left_padded_batch_matches_local(served):
    model, local = served
    assert_padded_batch_matches(model, local, random_ids(3, 9, seed=4), max_new_tokens=8, min_new_tokens=8)


def test_beam_search_matches_local(served):
    model, local = served
    input_ids = random_ids(2, 6, seed=5)
    settings = dict(num_beams=3, max_new_tokens=7, min_new_tokens=7, num_return_sequences=2)
    assert torch.equal(model.generate(input_ids, **settings), local.generate(input_ids, **settings))


def test_multi_turn_session_matches_local(served):
    model, local = served
    first_turn, second_turn = random_ids(1, 8, seed=6), random_ids(1, 4, seed=7)
    with model.inference_session(max_length=64):
        first = model.generate(first_turn, max_new_tokens=5, min_new_tokens=5)
        second = model.generate(second_turn, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(first, local.generate(first_turn, max_new_tokens=5, min_new_tokens=5))
    conversation = torch.cat([first, second_turn], dim=1)
    expected = local.generate(conversation, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(second, expected[:, first.shape[1] :])


# What swarm cannot cut gets a clear error, at the client and at the server

UNSUPPORTED = {
    "qwen2_moe": (  # transformers fuses its experts while loading a checkpoint
        "Qwen2MoeConfig",
        {**LAYERS, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "num_experts": 4},
        "fused experts",
    ),
    "deberta-v2": (  # an encoder whose layers take relative position embeddings from its forward
        "DebertaV2Config", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37), "rel_embeddings",
    ),
    "clip": ("CLIPConfig", {}, "no single list"),  # two towers
    "bart": ("BartConfig", dict(d_model=32, encoder_layers=2, decoder_layers=2), "encoder-decoder model"),
    "speecht5": (  # served as text to speech only
        "SpeechT5Config", dict(hidden_size=32, encoder_layers=2, decoder_layers=2), "serves it as SpeechT5ForTextToSpeech",
    ),
    "albert": (  # one group of layers run num_hidden_layers times
        "AlbertConfig", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37), "layers from a list of 1",
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(UNSUPPORTED))
def unsupported(request, tmp_path_factory):
    config_class, settings, reason = UNSUPPORTED[request.param]
    directory = tmp_path_factory.mktemp("models") / request.param
    getattr(transformers, config_class)(**settings).save_pretrained(directory)
    return directory, request.param, reason


def test_unsupported_model_is_refused_by_the_client(unsupported):
    directory, model_type, reason = unsupported
    with pytest.raises(UnsupportedModelError, match=f"model type '{model_type}'.*{reason}") as error:
        AutoDistributedModel.from_pretrained(directory, initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmNobody"])
    assert error.value.model_type == model_type


def test_unsupported_model_is_refused_at_server_start(unsupported):
    directory, model_type, reason = unsupported
    code, output = run_server_cli(str(directory), "--new-swarm", "--host", "127.0.0.1")
    assert code == 2
    assert f"model type '{model_type}'" in output and reason in output
