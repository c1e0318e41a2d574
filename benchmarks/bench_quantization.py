"""Quantization benchmark: what serving blocks in bfloat16, int8 or nf4 saves and what it costs, against float32.

    python benchmarks/bench_quantization.py [--prompts 20] [--new-tokens 32]

SmolLM2-135M-Instruct, for each precision (`python -m swarm.server --torch-dtype bfloat16`, `--quant-type int8`,
`--quant-type nf4`, and float32): one server hosting all 30 blocks and one hosting block 0 alone, each from a
private copy of the checkpoint (so that no two processes share the pages of a mapped file). A client pinned to
the 30-block server of each precision measures, side by side with the local float32 model in the same run:

- memory per block: (PSS of the 30-block server's process tree - PSS of the 1-block one's) / 29, after both
  have served;
- tokens/s of one greedy generation of `--new-tokens` tokens (EOS suppressed);
- on `--prompts` chat prompts, each followed by the local float32 model's greedy continuation (teacher forcing):
  the largest logit difference from float32 and the share of positions whose greedy token is float32's;
- the perplexity of the model on a public-domain text shipped with the benchmark
  (`data/declaration_of_independence.txt`, the first part of the United States Declaration of Independence).
"""

from __future__ import annotations

import os

# Client and servers share this machine's cores: set before torch loads (see swarm.launch.LOCAL_PEER_ENV).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse
import math
import re
import tempfile
from pathlib import Path

import torch
from bench_generate import private_copy, tree_pss
from timing import format_table, generate_timed, machine_line
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.launch import LocalSwarm
from swarm.smollm2 import smollm2_checkpoint

PRECISIONS = {  # name -> server arguments
    "float32": (),
    "bfloat16": ("--torch-dtype", "bfloat16"),
    "int8": ("--quant-type", "int8"),
    "nf4": ("--quant-type", "nf4"),
}
TEXT = Path(__file__).parent / "data" / "declaration_of_independence.txt"
QUESTIONS = [
    "Why is the sky blue?", "What is a prime number?", "Name three uses of copper.", "What does a compiler do?",
    "Describe the water cycle.", "How do vaccines work?", "What is photosynthesis?", "Why do we have seasons?",
    "What is an atom made of?", "How does a bicycle stay upright?", "What causes tides?", "What is inflation?",
    "How do bees make honey?", "What is a black hole?", "Why is the ocean salty?", "How does a rainbow form?",
    "What is gravity?", "How do computers store numbers?", "What is democracy?", "Why do leaves change colour?",
]  # fmt: skip
MIB = 1 << 20


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tokenizer(chat, return_tensors="pt", add_special_tokens=False).input_ids


def teacher_forced(local, tokenizer, prompts: int, new_tokens: int) -> list[tuple[torch.Tensor, int]]:
    """Each prompt followed by float32's greedy continuation, with the prompt's length."""
    sequences = []
    with torch.inference_mode():
        for question in (QUESTIONS * (prompts // len(QUESTIONS) + 1))[:prompts]:
            input_ids = chat_ids(tokenizer, question)
            output = local.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            sequences.append((output, input_ids.shape[1]))
    return sequences


def quality(model, local, sequences) -> tuple[float, float]:
    """The largest logit difference from the local float32 model over the continuations, and the share of
    positions whose greedy token agrees with float32's."""
    largest, agreeing, total = 0.0, 0, 0
    with torch.inference_mode():
        for sequence, prompt_length in sequences:
            logits = model(sequence).logits[0, prompt_length - 1 : -1].float()
            expected = local(sequence).logits[0, prompt_length - 1 : -1].float()
            largest = max(largest, (logits - expected).abs().max().item())
            agreeing += (logits.argmax(-1) == expected.argmax(-1)).sum().item()
            total += logits.shape[0]
    return largest, agreeing / total


def perplexity(model, input_ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(input_ids).logits[0, :-1].float()
    return math.exp(torch.nn.functional.cross_entropy(logits, input_ids[0, 1:]).item())


def peer_id(server) -> str:
    return re.search(r"ready: .* peer (\S+)", "\n".join(server.lines)).group(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    args = parser.parse_args()
    checkpoint = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    local = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    sequences = teacher_forced(local, tokenizer, args.prompts, args.new_tokens)
    text_ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids
    prompt = {"input_ids": chat_ids(tokenizer, QUESTIONS[0])}
    prompt["attention_mask"] = torch.ones_like(prompt["input_ids"])
    rows = [["precision", "MiB per block", "tokens/s", "max |logit diff|", "greedy agreement", "perplexity"]]
    rows.append(["local float32", "-", f"{generate_timed(local, prompt, args.new_tokens).tokens_per_second:.2f}",
                 "0", "100.0%", f"{perplexity(local, text_ids):.3f}"])  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        for name in args.precisions:
            server_args = PRECISIONS[name]
            copies = [private_copy(checkpoint, Path(work) / f"{name}-{span}") for span in ("all", "one")]
            with LocalSwarm(copies[0], ["0:30"], server_args=server_args, log_dir=Path(work) / f"logs-{name}") as swarm:
                config = ClientConfig(initial_peers=swarm.initial_peers, pinned_peers={peer_id(swarm.servers[0])})
                model = AutoDistributedModel.from_pretrained(copies[0], client_config=config)
                try:
                    speed = generate_timed(model, prompt, args.new_tokens).tokens_per_second
                    largest, agreement = quality(model, local, sequences)
                    ppl = perplexity(model, text_ids)
                finally:
                    model.remote.shutdown()
                with LocalSwarm(copies[1], ["0:1"], server_args=server_args, initial_peers=swarm.initial_peers) as single:
                    one = single.servers[0]
                    served = AutoDistributedModel.from_pretrained(copies[1], client_config=ClientConfig(
                        initial_peers=swarm.initial_peers, pinned_peers={peer_id(one)}))  # fmt: skip
                    try:
                        served(prompt["input_ids"])
                    finally:
                        served.remote.shutdown()
                    per_block = (tree_pss(swarm.servers[0].pid)[1] - tree_pss(one.pid)[1]) / 29
            rows.append([name, f"{per_block / MIB:.2f}", f"{speed:.2f}", f"{largest:.4f}", f"{agreement:.1%}", f"{ppl:.3f}"])
            print(f"{name}: done", flush=True)
    print(f"\n{machine_line()}; SmolLM2-135M-Instruct, {args.prompts} prompts x {args.new_tokens} tokens of float32's "
          f"greedy continuation, perplexity on {text_ids.shape[1]} tokens of {TEXT.name}")  # fmt: skip
    print(format_table(rows))


if __name__ == "__main__":
    main()
