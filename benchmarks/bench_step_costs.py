"""What one decode step costs on each side, in this process, without a network: the client's own code and a server's.

    python benchmarks/bench_step_costs.py [--model DIR] [--span 10:20] [--steps 200]

1. **Client.** The distributed model's forward for one new token in an inference session, as `generate()` calls
   it, with its head replaced by an identity (the head costs the same as the local model's) and the session's
   servers answering at once with the hidden states they were sent: what the client adds per token.
2. **Server.** `family.forward` of one decode step through the blocks of `--span`, in a session, after a
   41-token prefill: what a server computes per token, with its fast path if its blocks pass the check.

Medians of `--steps` steps, three rounds each. Without `--model`, SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from swarm.checkpoint import CheckpointIndex
from swarm.client.base import load_client_model
from swarm.client.causal_lm import DistributedModelForCausalLM
from swarm.models import family_for
from swarm.models.base import load_span
from swarm.spans import BlockSpan

PROMPT_LENGTH = 41


class AnsweringSession:
    """Stands for an inference session whose servers return what they receive at once."""

    position, skip_tokens, output_ids = PROMPT_LENGTH, 0, None

    def step(self, tensors, **kwargs):
        return {"hidden_states": tensors["hidden_states"]}

    def take_hypo_ids(self):
        return None


def median_ms(function, steps: int) -> float:
    for _ in range(20):
        function()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def client_step_ms(path: Path, config, family, steps: int) -> float:
    model = load_client_model(path, config, family, None, torch.float32, DistributedModelForCausalLM)
    model.lm_head = torch.nn.Identity()
    model._swarm_local.session = AnsweringSession()
    input_ids, positions = torch.tensor([[5]]), torch.tensor([[PROMPT_LENGTH]])
    mask = torch.ones(1, PROMPT_LENGTH + 1, dtype=torch.long)
    with torch.inference_mode():
        return median_ms(lambda: model(input_ids=input_ids, position_ids=positions, attention_mask=mask), steps)


def server_step_ms(path: Path, config, family, span: BlockSpan, steps: int) -> tuple[float, bool]:
    loaded = load_span(family, config, CheckpointIndex(path), span, torch.float32, "cpu")
    width = config.hidden_size
    with torch.inference_mode():
        state = family.new_session_state(loaded, span, PROMPT_LENGTH + 21 + steps)
        family.forward(loaded, span, {"hidden_states": torch.randn(1, PROMPT_LENGTH, width)}, state, None)
        inputs = {"hidden_states": torch.randn(1, 1, width)}
        return median_ms(lambda: family.forward(loaded, span, inputs, state, None), steps), loaded.fast_path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--span", default="10:20", help="the server's blocks, START:END")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    if args.model is None:
        from swarm.smollm2 import smollm2_checkpoint

        args.model = smollm2_checkpoint()
    config = AutoConfig.from_pretrained(args.model)
    family = family_for(config)
    config = family.prepare_config(config)
    span = BlockSpan(*map(int, args.span.split(":")))
    print(f"{args.model.name}, {torch.get_num_threads()} torch threads, median of {args.steps} steps")
    for round_number in range(1, 4):
        client = client_step_ms(args.model, config, family, args.steps)
        server, fast = server_step_ms(args.model, config, family, span, args.steps)
        print(f"round {round_number}: client {client:.3f} ms (head excluded), server blocks {span} {server:.3f} ms"
              f" ({'fast path' if fast else 'layers as they are'})")


if __name__ == "__main__":
    main()
