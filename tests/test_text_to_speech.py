"""SpeechT5 (text to speech) through three real servers on 127.0.0.1 against the local Hugging Face model.

The model is tiny and random (3 encoder and 4 decoder layers, cut "0:2", "2:5" (from the encoder into the
decoder) and "5:7"); its HiFi-GAN vocoder, tiny and random too, runs on the client. SpeechT5's speech pre-net
applies dropout even in evaluation, so each run starts from the same seed.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    SpeechT5Config,
    SpeechT5ForTextToSpeech,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
    pipeline,
)

from swarm.checkpoint import CheckpointIndex, load_model_config
from swarm.client.text_to_speech import DistributedModelForTextToSpeech
from swarm.errors import UnsupportedModelError
from swarm.models import FAMILIES, family_for
from swarm.models.base import load_span
from swarm.spans import BlockSpan
from tests.conftest import ATOL, served_model

SPANS = ["0:2", "2:5", "5:7"]
SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz .,'"]
LENGTHS = dict(minlenratio=1.5, maxlenratio=2.5)  # spectrograms of 1.5 to 2.5 frames of reduction_factor per symbol


def make_tiny_speecht5(directory):
    config = SpeechT5Config(
        vocab_size=len(SYMBOLS),
        hidden_size=36,
        encoder_layers=3,
        decoder_layers=4,
        encoder_attention_heads=4,
        decoder_attention_heads=2,
        encoder_ffn_dim=44,
        decoder_ffn_dim=52,
        num_mel_bins=20,
        speech_decoder_prenet_units=24,
        speech_decoder_postnet_units=24,
        speech_decoder_postnet_layers=2,
        speaker_embedding_dim=16,
        reduction_factor=2,
        encoder_max_relative_position=16,
        max_text_positions=64,
        max_speech_positions=256,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    SpeechT5ForTextToSpeech(config).eval().save_pretrained(directory)
    tokenizer = Tokenizer(models.WordLevel({symbol: index for index, symbol in enumerate(SYMBOLS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>").save_pretrained(directory)
    return directory


def make_tiny_vocoder():
    torch.manual_seed(1)
    config = SpeechT5HifiGanConfig(
        model_in_dim=20,
        upsample_initial_channel=16,
        upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        sampling_rate=16000,
    )
    return SpeechT5HifiGan(config).eval()


@pytest.fixture(scope="module")
def speecht5(tmp_path_factory, bootstrap_peers):
    """(distributed model, local model, tokenizer, vocoder)."""
    directory = make_tiny_speecht5(tmp_path_factory.mktemp("models") / "tiny-speecht5")
    local = SpeechT5ForTextToSpeech.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    with served_model(directory, SPANS, bootstrap_peers, tmp_path_factory.mktemp("logs")) as model:
        yield model, local, tokenizer, make_tiny_vocoder()


def speaker():
    return torch.randn(1, 16, generator=torch.Generator().manual_seed(3))


def seeded(function, *args, **kwargs):
    torch.manual_seed(5)
    with torch.no_grad():
        return function(*args, **kwargs)


def test_auto_model_is_the_speecht5_class(speecht5):
    model, _, _, _ = speecht5
    assert isinstance(model, SpeechT5ForTextToSpeech)
    assert isinstance(model, DistributedModelForTextToSpeech)


def test_spectrogram_matches_local(speecht5):
    model, local, tokenizer, _ = speecht5
    input_ids = tokenizer("hello swarm", return_tensors="pt").input_ids
    remote = seeded(model.generate_speech, input_ids, speaker(), **LENGTHS)
    expected = seeded(local.generate_speech, input_ids, speaker(), **LENGTHS)
    assert remote.shape == expected.shape and remote.shape[0] > 2 * local.config.reduction_factor
    torch.testing.assert_close(remote, expected, atol=ATOL, rtol=0)


def test_padded_batch_waveforms_match_local(speecht5):
    model, local, tokenizer, vocoder = speecht5
    inputs = tokenizer(["hello swarm", "hi"], padding=True, return_tensors="pt")
    kwargs = dict(attention_mask=inputs.attention_mask, speaker_embeddings=speaker(), vocoder=vocoder, **LENGTHS)
    remote, remote_lengths = seeded(model.generate, inputs.input_ids, return_output_lengths=True, **kwargs)
    expected, expected_lengths = seeded(local.generate, inputs.input_ids, return_output_lengths=True, **kwargs)
    assert remote_lengths == expected_lengths
    torch.testing.assert_close(remote, expected, atol=ATOL, rtol=0)


def test_forward_matches_local(speecht5):
    model, local, tokenizer, _ = speecht5
    inputs = tokenizer(["hello swarm", "hi"], padding=True, return_tensors="pt")
    frames = torch.randn(2, 6, local.config.num_mel_bins, generator=torch.Generator().manual_seed(4))
    kwargs = dict(**inputs, decoder_input_values=frames, speaker_embeddings=speaker().repeat(2, 1))
    remote, expected = seeded(model, **kwargs), seeded(local, **kwargs)
    torch.testing.assert_close(remote.spectrogram, expected.spectrogram, atol=ATOL, rtol=0)


def test_text_to_speech_pipeline_matches_local(speecht5):
    model, local, tokenizer, vocoder = speecht5
    forward_params = {"speaker_embeddings": speaker(), **LENGTHS}
    remote = seeded(pipeline("text-to-speech", model=model, tokenizer=tokenizer, vocoder=vocoder), "hello world", forward_params=forward_params)
    expected = seeded(pipeline("text-to-speech", model=local, tokenizer=tokenizer, vocoder=vocoder), "hello world", forward_params=forward_params)
    assert remote["sampling_rate"] == expected["sampling_rate"] == 16000
    assert remote["audio"].shape == expected["audio"].shape and remote["audio"].size > 0
    torch.testing.assert_close(torch.from_numpy(remote["audio"]), torch.from_numpy(expected["audio"]), atol=ATOL, rtol=0)


def test_cross_attentions_are_refused_by_name(speecht5):
    model, _, tokenizer, _ = speecht5
    input_ids = tokenizer("hi", return_tensors="pt").input_ids
    with pytest.raises(UnsupportedModelError, match="cross-attentions"):
        model.generate_speech(input_ids, speaker(), output_cross_attentions=True)


def test_encoder_blocks_in_bfloat16_compute_what_the_model_in_bfloat16_does(tmp_path):
    """A span of encoder blocks loaded in bfloat16, with the relative position embedding their server computes for
    them in bfloat16 too, gives the hidden states the local bfloat16 model gives after the same blocks."""
    directory = make_tiny_speecht5(tmp_path / "tiny-speecht5")
    local = SpeechT5ForTextToSpeech.from_pretrained(directory, dtype=torch.bfloat16).eval()
    config, weights = load_model_config(directory, FAMILIES)
    family = family_for(config)
    loaded = load_span(family, family.prepare_config(config), CheckpointIndex(weights), BlockSpan(0, 2), torch.bfloat16, "cpu")
    input_ids = torch.tensor([[3, 7, 9, 4, 12, 5]])
    with torch.inference_mode():
        hidden_states = local.speecht5.encoder(input_ids, output_hidden_states=True).hidden_states
        served = family.forward(loaded, BlockSpan(0, 2), {"hidden_states": hidden_states[0]}, None, None)["hidden_states"]
    assert served.dtype == torch.bfloat16
    torch.testing.assert_close(served, hidden_states[2], atol=0, rtol=0)
