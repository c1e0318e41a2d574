"""What identities and output verification cost, in one run.

    python benchmarks/bench_security.py [--connections 200] [--new-tokens 48]

1. Signatures: signing and checking one server record (Ed25519), per record.
2. Connecting: opening a connection and making one `info` request, `--connections` times, with the `hello`
   handshake (the server signs a nonce, the client checks it against the peer id) and without it.
3. Verification: SmolLM2-135M on 3 servers on 127.0.0.1, each hosting all 30 blocks; a greedy generation of
   `--new-tokens` tokens with `ClientConfig(verify=None)`, `VerifyConfig(fraction=0.05)` and `fraction=1.0`:
   tokens per second, and whether the tokens are the unverified run's.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch
from transformers import AutoTokenizer

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.client.verify import VerifyConfig
from swarm.identity import Identity
from swarm.launch import LocalSwarm
from swarm.records import ServerRecord, ServerState
from swarm.smollm2 import smollm2_checkpoint
from swarm.transport import Connection

PROMPT = "Write a short story about a lighthouse keeper."


def per_call(function, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def signatures():
    identity = Identity.generate()
    fields = dict(start=0, end=30, state=ServerState.ONLINE, throughput=100.0, version="0", address="127.0.0.1:1", dtype="float32")
    record = ServerRecord.signed(identity, **fields)
    print("Signatures (Ed25519), per server record:")
    print(f"  {'sign':<44} {per_call(lambda: ServerRecord.signed(identity, **fields), 2000) * 1e6:8.1f} us")
    print(f"  {'check':<44} {per_call(record.verified, 2000) * 1e6:8.1f} us")


def connecting(model, server: ServerRecord, count: int):
    remote = model.remote

    def with_hello():
        connection = remote.open_connection(server)
        connection.request({"method": "info"})
        connection.close()

    def without_hello():
        connection = Connection(server.address, timeout=5)
        connection.request({"method": "info"})
        connection.close()

    times = {name: statistics.median(per_call(function, count // 10) for _ in range(10))
             for name, function in [("without", without_hello), ("with", with_hello)]}  # fmt: skip
    print(f"Connecting and one info request, median of 10 x {count // 10}:")
    print(f"  {'plain TCP connection':<44} {times['without'] * 1e3:8.2f} ms")
    print(f"  {'with the hello handshake':<44} {times['with'] * 1e3:8.2f} ms   (+{(times['with'] - times['without']) * 1e3:.2f} ms)")


def tokens_per_second(model, input_ids, new_tokens: int) -> tuple[float, torch.Tensor]:
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(input_ids, max_new_tokens=2)  # warm-up: routes, pings, shadows' connections
    started = time.perf_counter()
    output = model.generate(input_ids, **settings)
    return new_tokens / (time.perf_counter() - started), output


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    signatures()
    checkpoint = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    chat = [{"role": "user", "content": PROMPT}]
    input_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with tempfile.TemporaryDirectory() as logs, LocalSwarm(checkpoint, ["0:30"] * 3, log_dir=logs) as swarm:
        results = {}
        for name, verify in [("no verification", None), ("verify 5% of steps", VerifyConfig(fraction=0.05, seed=0)),
                             ("verify every step", VerifyConfig(fraction=1.0))]:  # fmt: skip
            config = ClientConfig(initial_peers=swarm.initial_peers, verify=verify)
            model = AutoDistributedModel.from_pretrained(checkpoint, client_config=config)
            try:
                if not results:
                    connecting(model, model.remote.plan_route()[0].server, args.connections)
                results[name] = tokens_per_second(model, input_ids, args.new_tokens)
            finally:
                model.remote.shutdown()
    baseline, expected = results["no verification"]
    print(f"SmolLM2-135M, 3 servers of all 30 blocks, {args.new_tokens} greedy tokens:")
    for name, (speed, output) in results.items():
        print(f"  {name:<44} {speed:8.1f} tokens/s   {speed / baseline:5.2f}x   tokens identical: {torch.equal(output, expected)}")


if __name__ == "__main__":
    main()
