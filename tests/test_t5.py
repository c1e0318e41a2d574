"""T5 (encoder-decoder) through real servers, with a span crossing from the encoder into the decoder."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, EncoderDecoderCache, T5Config, T5ForConditionalGeneration

from swarm import AutoDistributedModel
from swarm.client.seq2seq_lm import DistributedModelForSeq2SeqLM
from swarm.launch import LocalSwarm
from swarm.spans import BlockSpan
from tests.conftest import ATOL, assert_same_generation, generate_concurrently, server_info
from tests.test_fast_path import load
from tests.test_push import push_counts
from tests.test_quantization import loaded_by_transformers
from tests.test_speculative import counted_crops


def make_tiny_t5(directory, **overrides):
    settings = dict(
        vocab_size=90,
        d_model=40,
        d_kv=8,
        d_ff=56,
        num_layers=3,
        num_decoder_layers=4,
        num_heads=5,
        relative_attention_num_buckets=8,
        initializer_factor=3.0,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(**{**settings, **overrides})).eval().save_pretrained(directory)
    return directory


def fresh_cache():
    """transformers sizes T5's default cache by the encoder's depth, which breaks deeper decoders."""
    return EncoderDecoderCache(DynamicCache(), DynamicCache())


@pytest.fixture(scope="module", params=[{}, {"tie_word_embeddings": False, "num_layers": 2}], ids=["tied", "untied"])
def t5_setup(request, tmp_path_factory):
    directory = make_tiny_t5(tmp_path_factory.mktemp("models") / "tiny-t5", **request.param)
    num_layers = request.param.get("num_layers", 3)
    spans = ["0:2", f"2:{num_layers + 2}", f"{num_layers + 2}:{num_layers + 4}"]
    local = T5ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    with LocalSwarm(directory, spans, log_dir=tmp_path_factory.mktemp("logs")) as swarm:
        model = AutoDistributedModel.from_pretrained(directory, initial_peers=swarm.initial_peers)
        yield model, local
        model.remote.shutdown()


def encoder_batch():
    input_ids = torch.randint(2, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


def test_auto_model_is_seq2seq(t5_setup):
    model, _ = t5_setup
    assert isinstance(model, DistributedModelForSeq2SeqLM)


def test_logits_match_local(t5_setup):
    model, local = t5_setup
    input_ids, attention_mask = encoder_batch()
    decoder_input_ids = torch.randint(2, 90, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        remote = model(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
        expected = local(input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(remote, expected, atol=ATOL, rtol=0)


def test_greedy_generation_matches_local(t5_setup):
    model, local = t5_setup
    input_ids, attention_mask = encoder_batch()
    settings = dict(attention_mask=attention_mask, max_new_tokens=10, output_logits=True, return_dict_in_generate=True)
    remote = model.generate(input_ids, **settings)
    expected = local.generate(input_ids, cache=fresh_cache(), **settings)
    assert_same_generation(remote, expected)
    assert max(len(set(row.tolist())) for row in remote.sequences) > 4


def test_decoder_steps_are_pushed_across_the_encoder_decoder_boundary(t5_setup):
    """The middle server hosts the last encoder blocks and the first decoder ones: it pushes each decoder step on."""
    model, local = t5_setup
    input_ids, attention_mask = encoder_batch()
    before = sum(counts["pushed"] for counts in push_counts(model.remote).values())
    remote = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6)
    assert torch.equal(remote, local.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, cache=fresh_cache()))
    assert sum(counts["pushed"] for counts in push_counts(model.remote).values()) - before == 6


def test_beam_search_matches_local(t5_setup):
    model, local = t5_setup
    input_ids, attention_mask = encoder_batch()
    settings = dict(attention_mask=attention_mask, max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert torch.equal(model.generate(input_ids, **settings), local.generate(input_ids, cache=fresh_cache(), **settings))


def test_seeded_sampling_matches_local(t5_setup):
    model, local = t5_setup
    input_ids, attention_mask = encoder_batch()
    settings = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=True, top_k=30, temperature=0.9)
    torch.manual_seed(3)
    remote = model.generate(input_ids, **settings)
    torch.manual_seed(3)
    assert torch.equal(remote, local.generate(input_ids, cache=fresh_cache(), **settings))


@pytest.fixture(scope="module")
def t5_draft():
    """A smaller T5 of the same vocabulary, whose drafts the tiny T5 mostly rejects."""
    torch.manual_seed(5)
    config = T5Config(vocab_size=90, d_model=24, d_kv=8, d_ff=30, num_layers=2, num_heads=3, relative_attention_num_buckets=8,
                      initializer_factor=3.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    return T5ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("assisted", ["prompt lookup", "draft model"])
def test_assisted_decoding_matches_the_local_models(t5_setup, t5_draft, assisted, monkeypatch):
    """Each step runs the drafts through the decoder's servers at once (across the encoder/decoder boundary's
    server, pushing) and the ones not accepted are cropped. The reference is the local model's own assisted
    decoding: transformers' T5 gives logits for several decoder tokens at once that differ by up to 1e-3 from
    those it gives one at a time."""
    model, local = t5_setup
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 1]])
    settings = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assistance = {"prompt_lookup_num_tokens": 3} if assisted == "prompt lookup" else {"assistant_model": t5_draft}
    dropped = counted_crops(monkeypatch)
    remote = model.generate(input_ids, **settings, **assistance)
    assert_same_generation(remote, local.generate(input_ids, cache=fresh_cache(), **settings, **assistance))
    assert any(count > 0 for count in dropped), f"no draft was ever rejected: {dropped}"


def test_hidden_states_match_local(t5_setup):
    """`output_hidden_states`: each stack's block outputs come back from the servers that ran them (one server's
    span crosses from the encoder into the decoder), recorded where the local model records them."""
    model, local = t5_setup
    input_ids, attention_mask = encoder_batch()
    decoder_input_ids = torch.randint(2, 90, (2, 5), generator=torch.Generator().manual_seed(3))
    arguments = dict(attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, output_hidden_states=True)
    with torch.no_grad():
        remote, expected = model(input_ids, **arguments), local(input_ids, **arguments)
    for name in ("encoder_hidden_states", "decoder_hidden_states"):
        assert len(remote[name]) == len(expected[name]) > 2
        for got, want in zip(remote[name], expected[name]):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("dtype", "quant_type"), [("bfloat16", "none"), ("float16", "none"), ("float32", "int8"), ("float16", "int8"), ("bfloat16", "nf4")])
def test_blocks_in_lower_precisions_compute_what_transformers_loads(tmp_path, dtype, quant_type):
    """A span of encoder blocks loaded in half precision or quantized gives the hidden states the local model that
    transformers loads so gives after the same blocks, to the bit: the relative position bias in the blocks' dtype,
    the feed-forward output layer (`wo`) in float32 in float16 and never quantized, as T5's class asks."""
    directory = make_tiny_t5(tmp_path / "tiny-t5", initializer_factor=1.0, d_model=64, d_kv=16, num_heads=4, d_ff=128)
    dtype = getattr(torch, dtype)
    local = loaded_by_transformers(T5ForConditionalGeneration, directory, dtype, quant_type)
    family, loaded = load(directory, BlockSpan(0, 2), dtype, quant_type=quant_type)
    wo = loaded.blocks[0].layer[1].DenseReluDense.wo
    assert type(wo) is torch.nn.Linear and wo.weight.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    input_ids, attention_mask = encoder_batch()
    with torch.inference_mode():
        expected = local.encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[2]
        inputs = {"hidden_states": local.encoder.embed_tokens(input_ids), "attention_mask": attention_mask}
        served = family.forward(loaded, BlockSpan(0, 2), inputs, None, None)["hidden_states"]
    torch.testing.assert_close(served, expected, atol=0, rtol=0)


def test_a_float16_swarm_computes_what_transformers_computes_in_float16(tmp_path):
    """Servers in float16 (spans starting within a stack) and a float16 client give the local float16 model's
    logits and hidden states to the bit, and its tokens when their sessions batch. transformers keeps `wo` in float32 there, so the hidden states
    between blocks are float32 from each stack's first feed-forward on: they travel so between servers and back."""
    directory = make_tiny_t5(tmp_path / "tiny-t5", initializer_factor=1.0)
    local = T5ForConditionalGeneration.from_pretrained(directory, dtype=torch.float16).eval()
    input_ids, attention_mask = encoder_batch()
    arguments = dict(attention_mask=attention_mask, decoder_input_ids=torch.tensor([[0, 5, 7], [0, 9, 3]]), output_hidden_states=True)
    jobs = {name: (torch.tensor([prompt]), {"max_new_tokens": 6, "cache": fresh_cache()})
            for name, prompt in [("a", [5, 6, 7, 8]), ("b", [20, 21, 22, 23]), ("c", [40, 41, 42, 43])]}  # fmt: skip
    server_args = ("--torch-dtype", "float16", "--batch-wait-ms", "100")
    with LocalSwarm(directory, ["0:2", "2:5", "5:7"], server_args=server_args, log_dir=tmp_path / "logs") as swarm:
        model = AutoDistributedModel.from_pretrained(directory, initial_peers=swarm.initial_peers, dtype=torch.float16)
        try:
            assert all(record.travel_dtype == "float32" for record in model.remote.fetch_records()[0])
            with torch.no_grad():
                remote, expected = model(input_ids, **arguments), local(input_ids, **arguments)
            alone = {name: model.generate(prompt, output_logits=True, return_dict_in_generate=True, **kwargs)
                     for name, (prompt, kwargs) in jobs.items()}  # fmt: skip
            together = generate_concurrently(model, {name: (prompt, {**kwargs, "cache": fresh_cache()}) for name, (prompt, kwargs) in jobs.items()})
            batches = sum(server_info(server.address)["batches"] for server in swarm.servers)
        finally:
            model.remote.shutdown()
    torch.testing.assert_close(remote.logits, expected.logits, atol=0, rtol=0)
    for name in ("encoder_hidden_states", "decoder_hidden_states"):
        for got, want in zip(remote[name], expected[name], strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert batches > 0
    for name, (prompt, kwargs) in jobs.items():
        want = local.generate(prompt, output_logits=True, return_dict_in_generate=True, **{**kwargs, "cache": fresh_cache()})
        assert torch.equal(alone[name].sequences, want.sequences) and torch.equal(together[name].sequences, want.sequences)
        for got, batched, wanted in zip(alone[name].logits, together[name].logits, want.logits, strict=True):
            torch.testing.assert_close(got, wanted, atol=0, rtol=0)
            # a batch's products over more rows round differently in float16 (by a unit in the last place or two)
            torch.testing.assert_close(batched, wanted, atol=1e-2, rtol=0)
