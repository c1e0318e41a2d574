"""Concurrency benchmark: many clients generating at once from one swarm, with continuous batching on and off.

    python benchmarks/bench_concurrency.py [--clients 1 2 4 8 16] [--new-tokens 64] [--batch-wait-ms 100]
                                           [--server-cpus 0] [--client-cpus 1] [--torch-dtype bfloat16]

SmolLM2-135M-Instruct (float32, or `--torch-dtype`: the servers' blocks and the client's head) is served by one server hosting all 30 blocks, then by a chain of 3 servers
(0:10, 10:20, 20:30); each by two swarms at once, one batching (`--batch-wait-ms`) and one not (`--batch-wait-ms
0`), which serve in turns. For each number of clients N, N threads of this process share one distributed model
(as the HTTP API's requests do) and each generates `--new-tokens` greedy tokens (EOS suppressed) from a prompt of
its own, all starting together. Reported: aggregate tokens/s (every new token over the wall time until the last
client is done), the median client's tokens/s, the p50/p90 of the gaps between a client's tokens (its step
latency), the steps per batch the servers ran, how busy their compute threads were (seconds of compute over the
wall time, summed over the servers) and their compute time per forward (a batch, or a step run alone). Targets
(issue 18): with batching, 8 clients make >= 4x the aggregate tokens/s of one client, at a p50 step latency <= 2x
one client's.

The servers wait `--batch-wait-ms` 100 by default, not their own default of 5: a wait shorter than the clients'
turnaround (from a step's reply to the next step: here 8 threads' `generate` loops and their head, on one core)
splits the clients into two groups that take turns, each sending its steps while the server computes the other's
batch, so that batches hold half of them. The clients' heads join (`swarm.client.joining`): a head over 8 rows
costs what one over 1 row costs in bfloat16.

The clients' own work (embeddings, head, sampling) runs on this machine's cores beside the servers', unless
`--server-cpus` and `--client-cpus` give each side cores of its own (as separate machines would; each side then
computes with one thread per core it has). To tell the two apart, the run also times the local model's 30 blocks
decoding one token for a batch of N rows against one row (with a 40-token past), on the servers' cores: what
batching can give on them at best.
"""

from __future__ import annotations

import os

# Client and servers share this machine's cores: set before torch loads (see swarm.launch.LOCAL_PEER_ENV).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse
import contextlib
import logging
import statistics
import tempfile
import threading
import time

import torch
from timing import format_table, generate_timed, machine_line, percentile
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModel
from swarm.launch import LocalSwarm
from swarm.smollm2 import smollm2_checkpoint
from swarm.transport import Connection

TOPOLOGIES = {"1 server": ["0:30"], "3 servers": ["0:10", "10:20", "20:30"]}
QUESTIONS = [
    "Why is the sky blue?",
    "Explain in a few sentences how a rainbow forms.",
    "What is a prime number?",
    "Write a haiku about the sea.",
    "How do plants make food from sunlight? Answer briefly.",
    "Name three uses of copper.",
    "What does a compiler do?",
    "Describe the water cycle for a child.",
]
SPEEDUP_TARGET = 4.0  # aggregate tokens/s of 8 clients over 1 client's, with batching
LATENCY_TARGET = 2.0  # p50 step latency of 8 clients over 1 client's, with batching


def client_inputs(tokenizer, count: int) -> list[dict]:
    """A prompt of its own for each client (prompts of different lengths), as chat turns."""
    inputs = []
    for index in range(count):
        question = QUESTIONS[index % len(QUESTIONS)] + (f" (question {index})" if index >= len(QUESTIONS) else "")
        chat = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        encoded = tokenizer(chat, return_tensors="pt", add_special_tokens=False)
        inputs.append({"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask})
    return inputs


def run_clients(model, inputs: list[dict], new_tokens: int) -> dict[str, float]:
    """All clients at once; the figures of one row."""
    runs, errors, start = [None] * len(inputs), [], threading.Barrier(len(inputs) + 1)

    def client(index: int):
        start.wait()
        try:
            runs[index] = generate_timed(model, inputs[index], new_tokens)
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(inputs))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if errors:
        raise errors[0]
    gaps = [gap for run in runs for gap in run.gaps]
    return {
        "aggregate": len(inputs) * new_tokens / wall,
        "per_client": statistics.median(run.tokens_per_second for run in runs),
        "p50": percentile(gaps, 50) * 1000,
        "p90": percentile(gaps, 90) * 1000,
        "wall": wall,
    }


def blocks_alone(checkpoint, batch_sizes: list[int], dtype: torch.dtype, repeats: int = 10) -> dict[int, float]:
    """Median seconds of one decode step of the local model's blocks (no head) for each batch size."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    seconds = {}
    with torch.inference_mode():
        for batch in batch_sizes:
            cache = model.model(torch.randint(0, 1000, (batch, 40)), use_cache=True).cache
            token, times = torch.randint(0, 1000, (batch, 1)), []
            for _ in range(repeats):
                started = time.perf_counter()
                model.model(token, cache=cache, use_cache=True)
                times.append(time.perf_counter() - started)
                cache.crop(-1)
            seconds[batch] = statistics.median(times)
    return seconds


def batch_counts(swarm) -> tuple[int, int, float]:
    """Batches run, steps run in them and seconds of compute, summed over the servers of `swarm` (their `info`)."""
    batches = steps = seconds = 0
    for server in swarm.servers:
        connection = Connection(server.address, timeout=30)
        try:
            info, _ = connection.request({"method": "info"})
        finally:
            connection.close()
        batches, steps = batches + info["batches"], steps + info["steps_batched"]
        seconds += info["compute_seconds"]
    return batches, steps, seconds


def cpu_list(text: str) -> set[int]:
    """CPUs written as taskset does: "0", "0-3", "0,2,4-7"."""
    cpus = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


@contextlib.contextmanager
def on_cpus(cpus: set[int] | None):
    """Runs this thread, the threads and processes it starts, and torch's computations on `cpus` only (one torch
    thread per CPU; the environment passes that on to peers started meanwhile); None: as it was."""
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    os.environ["OMP_NUM_THREADS"] = str(len(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved[0])
        torch.set_num_threads(saved[1])
        if saved[2] is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved[2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=100.0, help="the servers' setting when batching is on")
    parser.add_argument("--topologies", nargs="+", choices=list(TOPOLOGIES), default=list(TOPOLOGIES))
    parser.add_argument("--server-cpus", help="CPUs of the servers (as taskset writes them: 0-3,6); with --client-cpus")
    parser.add_argument("--client-cpus", help="CPUs of the clients; default: the servers and clients share every CPU")
    parser.add_argument("--torch-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="what the servers' blocks and the client's head compute in")  # fmt: skip
    args = parser.parse_args()
    dtype = getattr(torch, args.torch_dtype)
    logging.basicConfig(level=logging.WARNING)
    checkpoint = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    inputs = client_inputs(tokenizer, max(args.clients))
    server_cpus, client_cpus = (cpu_list(cpus) if cpus else None for cpus in (args.server_cpus, args.client_cpus))
    if (server_cpus is None) != (client_cpus is None):
        parser.error("--server-cpus and --client-cpus go together")
    results = {}
    for topology in args.topologies:
        with contextlib.ExitStack() as stack:
            swarms, models = {}, {}
            with on_cpus(server_cpus):
                for batching, wait in (("on", args.batch_wait_ms), ("off", 0.0)):
                    logs = stack.enter_context(tempfile.TemporaryDirectory())
                    server_args = ("--batch-wait-ms", f"{wait:g}", "--torch-dtype", args.torch_dtype)
                    swarms[batching] = stack.enter_context(LocalSwarm(checkpoint, TOPOLOGIES[topology], server_args=server_args, log_dir=logs))
            stack.enter_context(on_cpus(client_cpus))
            for batching, swarm in swarms.items():
                model = AutoDistributedModel.from_pretrained(checkpoint, initial_peers=swarm.initial_peers, dtype=dtype)
                stack.callback(model.remote.shutdown)
                run_clients(model, inputs[:2], 4)  # warm-up
                models[batching] = swarm, model
            for clients in args.clients:  # on and off in turns, so that both see the same moments of a noisy machine
                for batching, (swarm, model) in models.items():
                    counts = batch_counts(swarm)
                    figures = run_clients(model, inputs[:clients], args.new_tokens)
                    batches, steps, seconds = (now - before for now, before in zip(batch_counts(swarm), counts))
                    forwards = batches + clients * args.new_tokens * len(swarm.servers) - steps  # a step per new token
                    figures["batch"] = steps / batches if batches else 1.0
                    figures["busy"] = seconds / figures["wall"]
                    figures["forward"] = seconds / forwards * 1000
                    results[topology, batching, clients] = figures
                    print(f"{topology}, batching {batching}, {clients} client(s): {figures['aggregate']:.1f} tokens/s", flush=True)
    print(f"\n{machine_line()}; SmolLM2-135M-Instruct {args.torch_dtype}, {args.new_tokens} greedy tokens per client, "
          f"batching on = --batch-wait-ms {args.batch_wait_ms:g}"
          + (f", servers on CPUs {args.server_cpus}, clients on CPUs {args.client_cpus}" if server_cpus else ""))  # fmt: skip
    results = dict(sorted(results.items(), key=lambda item: (args.topologies.index(item[0][0]), item[0][1] == "off")))
    rows = [["servers", "batching", "clients", "aggregate tok/s", "x 1 client", "per-client tok/s", "step p50 ms", "step p90 ms",
             "steps per batch", "servers busy", "ms per forward"]]  # fmt: skip
    for (topology, batching, clients), figures in results.items():
        solo = results.get((topology, batching, 1))
        speedup = f"{figures['aggregate'] / solo['aggregate']:.2f}x" if solo else "-"
        rows.append([topology, batching, str(clients), f"{figures['aggregate']:.1f}", speedup, f"{figures['per_client']:.2f}",
                     f"{figures['p50']:.1f}", f"{figures['p90']:.1f}", f"{figures['batch']:.1f}", f"{figures['busy']:.2f}",
                     f"{figures['forward']:.1f}"])  # fmt: skip
    print(format_table(rows))
    with on_cpus(server_cpus):
        local = blocks_alone(checkpoint, args.clients, dtype)
    rows = [["rows", "blocks' step ms", "tokens/s of the blocks", "x 1 row"]]
    for batch, seconds in local.items():
        rows.append([str(batch), f"{seconds * 1000:.1f}", f"{batch / seconds:.1f}", f"{batch * local[args.clients[0]] / seconds / args.clients[0]:.2f}x"])
    print("\nThe local model's blocks alone, one decode step (no head, no network):")
    print(format_table(rows))
    for topology in args.topologies:
        solo, eight = results.get((topology, "on", 1)), results.get((topology, "on", 8))
        if solo and eight:
            speedup, latency = eight["aggregate"] / solo["aggregate"], eight["p50"] / solo["p50"]
            print(f"{topology}, batching on, 8 clients: {speedup:.2f}x the aggregate of 1 (target >= {SPEEDUP_TARGET:g}x), "
                  f"p50 step latency {latency:.2f}x (target <= {LATENCY_TARGET:g}x)")  # fmt: skip


if __name__ == "__main__":
    main()
