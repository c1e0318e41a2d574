"""Assisted decoding through the swarm over a simulated 100 ms link, against plain decoding, in one run.

    python benchmarks/bench_speculative.py [--client-rtt 100] [--server-rtt 0] [--new-tokens 48]

SmolLM2-135M-Instruct on 3 servers on 127.0.0.1 (0:10, 10:20, 20:30), each behind a delay proxy: the client
(dialling from 127.0.0.2) is `--client-rtt` ms from every server, the servers `--server-rtt` ms from each other;
push between servers (the default). Greedy generations of `--new-tokens` tokens: plain, with prompt lookup
(`prompt_lookup_num_tokens=10`) on a prompt that asks to repeat a text, and with the local SmolLM2 as the draft
model for itself (every draft accepted: the upper bound of what a draft model gains). Reported: tokens/s of the
whole call, the speedup over plain, and whether the tokens equal plain decoding's.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from timing import format_table, machine_line
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.launch import LocalSwarm
from swarm.smollm2 import smollm2_checkpoint

SPANS = ["0:10", "10:20", "20:30"]
TEXT = "The quick brown fox jumps over the lazy dog. " * 3
PROMPT = f"Repeat this text exactly, three more times:\n{TEXT}"


def timed(model, input_ids, new_tokens: int, **assisted) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, **assisted)  # fmt: skip
    return new_tokens / (time.perf_counter() - started), output


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client-rtt", type=float, default=100.0)
    parser.add_argument("--server-rtt", type=float, default=0.0)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    checkpoint = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(chat, return_tensors="pt", add_special_tokens=False).input_ids
    draft = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    proxy_args = ("--delay-ms", str(args.server_rtt / 2), "--delay-from", f"127.0.0.2={args.client_rtt / 2}")
    with tempfile.TemporaryDirectory() as logs, LocalSwarm(checkpoint, SPANS, log_dir=logs, proxy_args=proxy_args) as swarm:
        model = AutoDistributedModel.from_pretrained(checkpoint, client_config=ClientConfig(initial_peers=swarm.initial_peers, source_host="127.0.0.2"))
        try:
            timed(model, input_ids, 2)
            plain_speed, plain = timed(model, input_ids, args.new_tokens)
            runs = {
                "prompt lookup (10 tokens)": timed(model, input_ids, args.new_tokens, prompt_lookup_num_tokens=10),
                "draft model (SmolLM2 itself)": timed(model, input_ids, args.new_tokens, assistant_model=draft),
            }
        finally:
            model.remote.shutdown()
    print(f"{machine_line()}; SmolLM2-135M, {len(SPANS)} servers, client RTT {args.client_rtt:g} ms, server RTT "
          f"{args.server_rtt:g} ms, {args.new_tokens} greedy tokens")  # fmt: skip
    rows = [["decoding", "tokens/s", "speedup", "tokens as plain"], ["plain", f"{plain_speed:.2f}", "1.00x", "-"]]
    for name, (speed, output) in runs.items():
        rows.append([name, f"{speed:.2f}", f"{speed / plain_speed:.2f}x", str(torch.equal(output, plain))])
    print(format_table(rows))


if __name__ == "__main__":
    main()
