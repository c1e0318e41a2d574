"""The OpenAI-compatible API against `model.generate`, in one run.

    python benchmarks/bench_api.py [--new-tokens 64] [--rounds 3] [--clients 8]

SmolLM2-135M-Instruct on 3 servers on 127.0.0.1 (0:10, 10:20, 20:30); the API (`swarm.api`) in a process of its
own. A greedy answer of `--new-tokens` tokens to one chat prompt: time to first token and tokens per second (the
answer's tokens over the time from the request to its last token; streamed text comes in pieces, not tokens),
streamed through the API (the `openai` package) against `model.generate` with a streamer in this process (the
target: the API at least 0.95 of direct), alternating the two for `--rounds` rounds and taking each one's median. Then `--clients` API clients at once, each streaming its own answer:
aggregate and per-client tokens per second.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import openai
from timing import TokenClock
from transformers import AutoTokenizer

from swarm import AutoDistributedModel
from swarm.launch import LocalSwarm, PeerProcess
from swarm.smollm2 import smollm2_checkpoint

PROMPT = "Write a short story about a lighthouse keeper."


def direct(model, tokenizer, new_tokens: int) -> tuple[float, float]:
    chat = [{"role": "user", "content": PROMPT}]
    input_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    clock = TokenClock()
    model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock)
    return clock.token_times[0] - clock.started, new_tokens / (clock.token_times[-1] - clock.started)


def through_api(url: str, name: str, new_tokens: int) -> tuple[float, float, int]:
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
    started, times = time.perf_counter(), []
    stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPT}], max_tokens=new_tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": False})  # fmt: skip
    finish = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        finish = chunk.choices[0].finish_reason if chunk.choices else finish
    assert finish == "length", f"the answer ended before {new_tokens} tokens ({finish}): tokens/s would be wrong"
    return times[0] - started, new_tokens / (times[-1] - started), len(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    checkpoint = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with tempfile.TemporaryDirectory() as logs, LocalSwarm(checkpoint, ["0:10", "10:20", "20:30"], log_dir=logs) as swarm:
        api = PeerProcess(["-m", "swarm.api", str(checkpoint), "--initial-peers", *swarm.initial_peers, "--port", "0"], name="api")
        model = AutoDistributedModel.from_pretrained(checkpoint, initial_peers=swarm.initial_peers)
        try:
            url = api.wait_for(r"ready: API for \S+ at (http://\S+)", 180).group(1)
            name = openai.OpenAI(base_url=url, api_key="none").models.list().data[0].id
            direct(model, tokenizer, 4), through_api(url, name, 4)  # warm-up
            directs, apis = [], []
            for _ in range(args.rounds):
                directs.append(direct(model, tokenizer, args.new_tokens))
                apis.append(through_api(url, name, args.new_tokens))
            direct_first, direct_speed = (statistics.median(values) for values in zip(*directs))
            api_first, api_speed, pieces = (statistics.median(values) for values in zip(*apis))
            results = [None] * args.clients

            def client(index: int):
                results[index] = through_api(url, name, args.new_tokens)

            threads = [threading.Thread(target=client, args=(index,)) for index in range(args.clients)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
        finally:
            model.remote.shutdown()
            api.stop()
    print(f"SmolLM2-135M, 3 servers, a greedy chat answer of {args.new_tokens} tokens (medians of {args.rounds} rounds):")
    print(f"  {'':<34} {'first token':>12} {'tokens/s':>10}")
    print(f"  {'model.generate (direct)':<34} {direct_first * 1e3:>9.1f} ms {direct_speed:>10.1f}")
    print(f"  {'API, streamed (' + str(int(pieces)) + ' pieces)':<34} {api_first * 1e3:>9.1f} ms {api_speed:>10.1f}   "
          f"{api_speed / direct_speed:.2f} of direct (target >= 0.95)")  # fmt: skip
    speeds = [speed for _, speed, _ in results]
    print(f"  {args.clients} API clients at once: {args.clients * args.new_tokens / elapsed:.1f} tokens/s in all, "
          f"{min(speeds):.1f} to {max(speeds):.1f} tokens/s each (one alone: {api_speed:.1f})")


if __name__ == "__main__":
    main()
