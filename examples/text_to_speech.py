"""Text to speech with SpeechT5's encoder and decoder in the swarm: `pipeline("text-to-speech")` on a local swarm.

    python examples/text_to_speech.py [--text "Hello from the swarm."] [--model DIR --vocoder DIR]

With no `--model`, builds a tiny random SpeechT5 and HiFi-GAN vocoder (no model hub here: the waveform is noise
and shows only that the pieces fit); real `SpeechT5ForTextToSpeech` and `SpeechT5HifiGan` checkpoint folders
work the same way. Starts a bootstrap peer and three servers on 127.0.0.1 (the middle one's span crosses from
the encoder into the decoder), runs the pipeline through them and locally, writes the swarm's speech to a WAV
file, and stops everything it started.
"""

import argparse
import tempfile
import wave
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    SpeechT5Config,
    SpeechT5ForTextToSpeech,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
    pipeline,
)

from swarm import AutoDistributedModel
from swarm.launch import LocalSwarm
from swarm.models import family_for

SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz .,'!?"]


def tiny_speecht5(directory: Path) -> tuple[Path, Path]:
    """A random SpeechT5 with a character tokenizer, and a random vocoder for its 40 mel bins."""
    config = SpeechT5Config(vocab_size=len(SYMBOLS), hidden_size=64, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=40,
                            speaker_embedding_dim=32, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    SpeechT5ForTextToSpeech(config).eval().save_pretrained(directory / "tts")
    tokenizer = Tokenizer(models.WordLevel({symbol: index for index, symbol in enumerate(SYMBOLS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>").save_pretrained(directory / "tts")
    vocoder = SpeechT5HifiGanConfig(model_in_dim=40, upsample_initial_channel=64, upsample_rates=[8, 8, 4],
                                    upsample_kernel_sizes=[16, 16, 8], sampling_rate=16000)  # fmt: skip
    SpeechT5HifiGan(vocoder).eval().save_pretrained(directory / "vocoder")
    return directory / "tts", directory / "vocoder"


def write_wav(path: Path, audio: np.ndarray, rate: int):
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default="Hello from the swarm.")
    parser.add_argument("--model", type=Path, help="a SpeechT5ForTextToSpeech folder (default: a tiny random one)")
    parser.add_argument("--vocoder", type=Path, help="a SpeechT5HifiGan folder (needed with --model)")
    args = parser.parse_args()
    if args.model and not args.vocoder:
        parser.error("--model needs --vocoder")
    model_dir, vocoder_dir = (args.model, args.vocoder) if args.model else tiny_speecht5(Path(tempfile.mkdtemp(prefix="tts-")))
    config = AutoConfig.from_pretrained(model_dir)
    blocks = family_for(config).num_blocks(config)  # the encoder's layers, then the decoder's
    spans = [f"0:{blocks // 3}", f"{blocks // 3}:{2 * blocks // 3}", f"{2 * blocks // 3}:{blocks}"]
    tokenizer, vocoder = AutoTokenizer.from_pretrained(model_dir), SpeechT5HifiGan.from_pretrained(vocoder_dir).eval()
    speaker = torch.randn(1, config.speaker_embedding_dim, generator=torch.Generator().manual_seed(0))
    forward_params = {"speaker_embeddings": speaker}
    if not args.model:
        forward_params["minlenratio"] = 2.0  # a random model would stop at once
    with LocalSwarm(model_dir, spans) as swarm:
        model = AutoDistributedModel.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        try:
            torch.manual_seed(0)  # SpeechT5's pre-net applies dropout even in evaluation
            speech = pipeline("text-to-speech", model=model, tokenizer=tokenizer, vocoder=vocoder)(args.text, forward_params=forward_params)
        finally:
            model.remote.shutdown()
    torch.manual_seed(0)
    local = SpeechT5ForTextToSpeech.from_pretrained(model_dir).eval()
    expected = pipeline("text-to-speech", model=local, tokenizer=tokenizer, vocoder=vocoder)(args.text, forward_params=forward_params)
    difference = float(np.abs(speech["audio"] - expected["audio"]).max()) if speech["audio"].shape == expected["audio"].shape else float("inf")
    output = Path(model_dir) / "speech.wav"
    write_wav(output, speech["audio"], speech["sampling_rate"])
    seconds = speech["audio"].shape[-1] / speech["sampling_rate"]
    print(f"{seconds:.2f} s of speech saved to {output}; largest difference from local: {difference:.2e}")


if __name__ == "__main__":
    main()
