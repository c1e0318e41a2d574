"""What the benchmarks share: timing `generate` token by token, percentiles, tables, prompts, spans.

Spans are half-open `START:END` strings, as on the `swarm.server` command line.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."
READY_PATTERN = r"ready: serving .* at (\S+:\d+),"  # a server's ready line; group 1 is its transport address
THREADING_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


class TokenClock(BaseStreamer):
    """A streamer that timestamps every new token; `generate` first puts the prompt, which is skipped."""

    def __init__(self):
        self.started = time.perf_counter()
        self.token_times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.token_times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self):
        pass


@dataclass
class GenerationRun:
    seconds: float  # wall time of the whole `generate` call
    first_token: float  # seconds from the call to the first new token
    gaps: list[float]  # seconds between successive new tokens
    new_tokens: torch.Tensor  # (new_tokens,)

    @property
    def tokens_per_second(self) -> float:
        return len(self.new_tokens) / self.seconds


def percentile(values: list[float], percent: float) -> float:
    """The `percent`-th percentile of `values`, interpolating between neighbours."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * percent / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def generate_timed(model, inputs: dict, max_new_tokens: int) -> GenerationRun:
    """One greedy `generate` call making exactly `max_new_tokens` tokens, timed token by token."""
    clock = TokenClock()
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,  # no early EOS: every run makes the same number of tokens
            streamer=clock,
        )
    seconds = time.perf_counter() - clock.started
    times = clock.token_times
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return GenerationRun(seconds, times[0] - clock.started, gaps, new_tokens)


def format_table(rows: list[list[str]]) -> str:
    """Rows of cells as aligned columns; the first row is the header."""
    widths = [max(len(row[column]) for row in rows if column < len(row)) for column in range(max(map(len, rows)))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def prompt_inputs(checkpoint: Path, prompt: str):
    """The prompt as a chat turn when the checkpoint has a tokenizer, else fixed token ids."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError, TypeError):
        input_ids = torch.arange(1, 33).unsqueeze(0)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, None
    if tokenizer.chat_template:
        turn = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(prompt, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}, tokenizer


def machine_line() -> str:
    """CPUs, torch threads and the threading variables that every process of the run inherits."""
    variables = [f"{name}={os.environ[name]}" for name in THREADING_VARIABLES if name in os.environ]
    return f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads" + "".join(f", {v}" for v in variables)


def even_spans(num_blocks: int, parts: int) -> list[str]:
    """`parts` contiguous spans covering `num_blocks` blocks as evenly as possible: 30, 3 -> 0:10 10:20 20:30."""
    bounds = [num_blocks * part // parts for part in range(parts + 1)]
    return [f"{start}:{end}" for start, end in zip(bounds, bounds[1:])]
