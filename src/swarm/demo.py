"""`python -m swarm.demo [--prompt TEXT] [--max-new-tokens N]`: a chat answer from a swarm on this machine.

Converts SmolLM2-135M-Instruct once (see `swarm.smollm2`), starts a bootstrap peer and three servers
on 127.0.0.1 hosting blocks [0, 10), [10, 20) and [20, 30), streams a greedy answer to the prompt
through them, then prints the route it took and its speed. Everything it started stops when it ends,
on Ctrl-C and on errors too.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, TextStreamer

from swarm import AutoDistributedModel
from swarm.client.routing import Hop
from swarm.launch import LocalSwarm
from swarm.logs import configure_logging
from swarm.smollm2 import smollm2_checkpoint

SPANS = ["0:10", "10:20", "20:30"]


@dataclass
class DemoConfig:
    prompt: str  # the user's message in the chat
    max_new_tokens: int  # the answer's length limit, in tokens


def parse_args(argv: list[str] | None = None) -> DemoConfig:
    parser = argparse.ArgumentParser(
        prog="python -m swarm.demo", description="Answer a chat prompt with SmolLM2 on three local servers."
    )
    parser.add_argument("--prompt", default="What is the capital of France?", help="the chat message to answer")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the answer's length limit (default: 64)")
    args = parser.parse_args(argv)
    return DemoConfig(prompt=args.prompt, max_new_tokens=args.max_new_tokens)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    configure_logging()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwind, so the servers stop
    try:
        run_demo(config)
    except KeyboardInterrupt:
        print("\nInterrupted; everything the demo started is stopped.", file=sys.stderr)
        return 130
    return 0


def run_demo(config: DemoConfig):
    checkpoint = smollm2_checkpoint()
    log_dir = Path(tempfile.mkdtemp(prefix="swarm-demo-logs-"))
    print(f"Starting a bootstrap peer and {len(SPANS)} servers (blocks {', '.join(SPANS)}); logs in {log_dir}")
    with LocalSwarm(checkpoint, SPANS, log_dir=log_dir) as swarm:
        answer(checkpoint, swarm.initial_peers, config)


def answer(checkpoint: Path, initial_peers: list[str], config: DemoConfig):
    """Streams the answer to `config.prompt`, then prints the route and the generation speed."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoDistributedModel.from_pretrained(checkpoint, initial_peers=initial_peers)
    try:
        chat = [{"role": "user", "content": config.prompt}]
        inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        prompt_length = inputs["input_ids"].shape[1]
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with model.inference_session(max_length=prompt_length + config.max_new_tokens) as session:
            print(f"\nUser: {config.prompt}\nAssistant: ", end="", flush=True)
            started = time.perf_counter()
            output_ids = model.generate(
                **inputs, max_new_tokens=config.max_new_tokens, do_sample=False, streamer=streamer
            )
            seconds = time.perf_counter() - started
        print_summary(session.route, output_ids.shape[1] - prompt_length, seconds)
    finally:
        model.remote.shutdown()


def print_summary(route: list[Hop], new_tokens: int, seconds: float):
    print("\nRoute:")
    for hop in route:
        print(f"  {hop}")
    speed = new_tokens / seconds
    print(f"Generated {new_tokens} tokens in {seconds:.2f} s: {speed:.1f} tokens/s (prefill of the prompt included)")


if __name__ == "__main__":
    sys.exit(main())
