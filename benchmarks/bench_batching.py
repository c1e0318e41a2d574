"""What one forward over several sessions' steps costs against the same steps run one by one, per family.

    python benchmarks/bench_batching.py [--sessions 2 4 8] [--repeats 5]

In one process, with no network: a server's blocks loaded as a server loads them (`load_span`), sessions opened
and prefilled as clients would, then one decode step of every session, run alone (`ModelFamily.forward`, session
after session) and as one batch (`forward_batch`), each on its own copy of the sessions, then the next step of the
same sessions as a batch again (which finds encoder-decoder sessions' cross-attention caches ready to share);
medians of `--repeats`.
Models: SmolLM2-135M's 30 blocks (sessions of 32 to 39 positions), a random T5 shaped as t5-small (its 6 decoder
blocks, over encoder outputs of 40 and of 400 positions) and Whisper tiny.en's 4 decoder blocks (over its 1500
encoder positions). The last column says whether a server batches such steps (`batch_key`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timing import format_table, machine_line
from transformers import T5Config, T5ForConditionalGeneration

from swarm.checkpoint import CheckpointIndex, load_model_config
from swarm.models import FAMILIES, family_for
from swarm.models.base import load_span
from swarm.smollm2 import smollm2_checkpoint
from swarm.spans import BlockSpan
from swarm.whisper import whisper_tiny_en_checkpoint

T5_SMALL = dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, vocab_size=1000,
                decoder_start_token_id=0)  # fmt: skip


def load_decoder(directory: Path):
    """The family and the loaded blocks of a model's decoder (all its blocks for a decoder-only model)."""
    config, weights = load_model_config(directory, FAMILIES)
    family = family_for(config)
    config = family.prepare_config(config)
    start = family.encoder_blocks(config) if hasattr(family, "encoder_blocks") else 0
    span = BlockSpan(start, family.num_blocks(config))
    return family, load_span(family, config, CheckpointIndex(weights), span, torch.float32, "cpu")


def hidden_width(family, loaded) -> int:
    return family.width(loaded.config) if hasattr(family, "width") else loaded.config.hidden_size


def open_sessions(family, loaded, count: int, source: int | None, generator) -> list:
    """`count` sessions after a prefill of 32 + i positions (over an encoder output of `source` positions)."""
    width = hidden_width(family, loaded)
    states = []
    for index in range(count):
        state = family.new_session_state(loaded, loaded.span, max_length=512)
        inputs = {"hidden_states": torch.randn(1, 32 + index, width, generator=generator)}
        if source is not None:
            inputs["encoder_hidden_states"] = torch.randn(1, source, width, generator=generator)
        with torch.inference_mode():
            family.forward(loaded, loaded.span, inputs, state, None)
        states.append(state)
    return states


def measure(family, loaded, states: list, repeats: int, generator) -> tuple[float, float, float, bool]:
    """Median seconds of one step of every session run alone, as one batch, and as the next batch of the same
    sessions (whose caches the first one may leave ready to batch), and whether they would batch."""
    alone, together, again = [], [], []
    for _ in range(repeats):
        steps = [{"hidden_states": torch.randn(1, 1, hidden_width(family, loaded), generator=generator)} for _ in states]
        copies = [copy.deepcopy(state) for state in states]
        with torch.inference_mode():
            started = time.perf_counter()
            for inputs, state in zip(steps, copies):
                family.forward(loaded, loaded.span, inputs, state, None)
            alone.append(time.perf_counter() - started)
            copies = [copy.deepcopy(state) for state in states]
            for times in (together, again):
                started = time.perf_counter()
                family.forward_batch(loaded, loaded.span, list(zip(steps, copies)))
                times.append(time.perf_counter() - started)
    batches = family.batch_key(loaded, loaded.span, steps[0], states[0], None) is not None
    return statistics.median(alone), statistics.median(together), statistics.median(again), batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        T5ForConditionalGeneration(T5Config(**T5_SMALL)).save_pretrained(Path(scratch) / "t5-small-shaped")
        models = [("SmolLM2-135M", smollm2_checkpoint(), [None]),
                  ("T5 (t5-small shape)", Path(scratch) / "t5-small-shaped", [40, 400]),
                  ("Whisper tiny.en", whisper_tiny_en_checkpoint(), [1500])]  # fmt: skip
        print(f"{machine_line()}; one decode step of every session, median of {args.repeats}\n")
        rows = [["model", "encoder positions", "sessions", "alone ms", "batched ms", "speedup", "next batch ms", "speedup",
                 "server batches"]]  # fmt: skip
        for name, directory, sources in models:
            family, loaded = load_decoder(directory)
            for source in sources:
                for count in args.sessions:
                    states = open_sessions(family, loaded, count, source, generator)
                    alone, together, again, batches = measure(family, loaded, states, args.repeats, generator)
                    rows.append([name, "-" if source is None else str(source), str(count), f"{alone * 1e3:.1f}",
                                 f"{together * 1e3:.1f}", f"{alone / together:.2f}x", f"{again * 1e3:.1f}",
                                 f"{alone / again:.2f}x", "yes" if batches else "no"])  # fmt: skip
                    print(format_table(rows), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
