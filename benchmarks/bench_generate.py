"""Generation benchmark: the swarm against local Hugging Face `generate`, on SmolLM2-135M-Instruct.

    python benchmarks/bench_generate.py [--max-new-tokens 64] [--prompt "..."] [--repeats 5]

One run measures, side by side with the local baseline measured in the same run:

1. Speed. Local `AutoModelForCausalLM` (float32) against a swarm of 3 servers on 127.0.0.1 hosting
   0:10, 10:20 and 20:30: tokens/s (new tokens / wall time of one `generate` call), per-token
   latency p50/p90 (gaps between tokens, first token excluded), time to first token. Greedy, EOS
   suppressed so every run makes exactly `--max-new-tokens` tokens. Both warm up once, then run
   `--repeats` times, interleaved, and the median is reported. Target: swarm/local tokens/s >= 0.90.
2. Memory. PSS of each server's process tree (the server, hivemind's DHT process, p2pd) after it has
   served, next to a full replica's (a second swarm with one server hosting every block, after one
   generation), all measured at the same moment so they share libraries with the same processes.
   Servers map their weights from the safetensors file and PSS splits a file's pages between the
   processes that map them, so the replica loads from a private copy of the checkpoint. Target: full replica minus a 10-block server >= 60% of the checkpoint bytes of the 20 blocks that
   the 10-block server does not host.
3. Transport. Round trip of one token's hidden state (1x1x576 float32) through a server's `echo`
   RPC, against a plain TCP echo of the same bytes to a thread of this process.
"""

from __future__ import annotations

import os

# Client and servers share this machine's cores: set before torch loads (see swarm.launch.LOCAL_PEER_ENV).
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse
import gc
import json
import logging
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from timing import (
    DEFAULT_PROMPT,
    READY_PATTERN,
    GenerationRun,
    even_spans,
    format_table,
    generate_timed,
    machine_line,
    percentile,
    prompt_inputs,
)
from transformers import AutoConfig, AutoModelForCausalLM

from swarm import AutoDistributedModel
from swarm.checkpoint import CheckpointIndex
from swarm.launch import LocalSwarm, PeerProcess
from swarm.models import family_for
from swarm.transport import Connection, receive_exactly

SPEED_TARGET = 0.90  # swarm tokens/s over local tokens/s
MEMORY_TARGET = 0.60  # (full replica PSS - 10-block server PSS) over the weight bytes of the 20 missing blocks
NOISY_SPREAD = 0.15  # best run over worst run - 1 above which the speed figures are flagged as unreliable
MIB = 1 << 20


# Speed


@dataclass
class SpeedResult:
    runs: list[GenerationRun] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in self.runs)

    def gap_percentile(self, percent: float) -> float:
        return percentile([gap for run in self.runs for gap in run.gaps], percent)

    @property
    def decode_tokens_per_second(self) -> float:
        return statistics.median(len(run.gaps) / sum(run.gaps) for run in self.runs)

    @property
    def best_tokens_per_second(self) -> float:
        return max(run.tokens_per_second for run in self.runs)

    @property
    def spread(self) -> float:
        """How much faster the best run was than the worst (0.1: 10%)."""
        rates = [run.tokens_per_second for run in self.runs]
        return max(rates) / min(rates) - 1


def measure_speed(models: dict[str, object], inputs: dict, max_new_tokens: int, repeats: int) -> dict[str, SpeedResult]:
    """Warms up each model once, then runs them in turn `repeats` times, so noise hits both alike."""
    for model in models.values():
        generate_timed(model, inputs, max_new_tokens)
    results = {name: SpeedResult() for name in models}
    for repeat in range(repeats):
        for name, model in models.items():
            run = generate_timed(model, inputs, max_new_tokens)
            results[name].runs.append(run)
            print(f"  run {repeat + 1}/{repeats} {name:>6}: {run.tokens_per_second:6.1f} tokens/s", flush=True)
    return results


def same_tokens(results: dict[str, SpeedResult]) -> bool:
    reference = results["local"].runs[0].new_tokens
    return all(torch.equal(run.new_tokens, reference) for result in results.values() for run in result.runs)


# Memory


def tree_pss(pid: int) -> tuple[int, int]:
    """PSS of a process and of all its descendants: (the process alone, the whole tree)."""
    root = psutil.Process(pid)
    own = total = root.memory_full_info().pss
    for child in root.children(recursive=True):
        try:
            total += child.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return own, total


def safetensors_sizes(path: Path) -> dict[str, int]:
    """Bytes of each tensor in a safetensors file, read from its header alone."""
    with open(path, "rb") as file:
        (header_length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_length))
    header.pop("__metadata__", None)
    return {name: entry["data_offsets"][1] - entry["data_offsets"][0] for name, entry in header.items()}


def missing_block_bytes(checkpoint: Path, spans: list[str], num_blocks: int) -> dict[str, int]:
    """For each span, the checkpoint bytes (in the file's dtype) of the blocks outside it."""
    config = AutoConfig.from_pretrained(checkpoint)
    family = family_for(config)
    config = family.prepare_config(config)
    index = CheckpointIndex(checkpoint)
    sizes = {name: size for file in set(index.file_of.values()) for name, size in safetensors_sizes(file).items()}
    missing = {}
    for span in spans:
        start, end = map(int, span.split(":"))
        outside = [block for block in range(num_blocks) if not start <= block < end]
        names = {name for block in outside for name in family.block_tensor_names(config, block, sizes)}
        missing[span] = sum(sizes[name] for name in names)
    return missing


# Transport


class PlainEchoServer:
    """A thread that echoes fixed-size messages back on one TCP connection: the floor for a round trip."""

    def __init__(self, message_size: int):
        self.message_size = message_size
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        sock, _ = self.listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with sock:
            while True:
                try:
                    sock.sendall(receive_exactly(sock, self.message_size, time.monotonic() + 60))
                except (ConnectionError, OSError):
                    return

    def close(self):
        self.listener.close()


def time_round_trips(round_trip, rounds: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        round_trip()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        round_trip()
        times.append(time.perf_counter() - started)
    return times


def measure_transport(server_address: str, hidden_size: int, rounds: int) -> dict[str, list[float]]:
    hidden = torch.randn(1, 1, hidden_size, dtype=torch.float32)
    connection = Connection(server_address, timeout=10.0)
    echo = PlainEchoServer(hidden.numel() * hidden.element_size())
    payload = hidden.numpy().tobytes()
    plain = socket.create_connection(echo.address)
    plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def swarm_echo():
        _, tensors = connection.request({"method": "echo"}, {"hidden_states": hidden})
        assert torch.equal(tensors["hidden_states"], hidden)

    def plain_echo():
        plain.sendall(payload)
        receive_exactly(plain, len(payload), time.monotonic() + 60)

    try:
        return {
            "swarm echo RPC": time_round_trips(swarm_echo, rounds, warmup=rounds // 10),
            "plain TCP echo": time_round_trips(plain_echo, rounds, warmup=rounds // 10),
        }
    finally:
        connection.close()
        plain.close()
        echo.close()


# Report


def verdict(value: float, target: float) -> str:
    return "PASS" if value >= target else "FAIL"


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def speed_rows(speed: dict[str, SpeedResult], identical: bool, hops: int) -> list[list[str]]:
    local, swarm = speed["local"], speed["swarm"]
    ratio = swarm.median("tokens_per_second") / local.median("tokens_per_second")
    decode_ratio = swarm.decode_tokens_per_second / local.decode_tokens_per_second
    overhead = swarm.gap_percentile(50) - local.gap_percentile(50)

    def both(name: str, seconds_of) -> list[str]:
        return [name, milliseconds(seconds_of(local)), milliseconds(seconds_of(swarm))]

    return [
        ["speed", "local HF", f"swarm ({hops} hops)", "swarm/local", "target", "result"],
        [
            "tokens/s (whole generate call)",
            f"{local.median('tokens_per_second'):.1f}",
            f"{swarm.median('tokens_per_second'):.1f}",
            f"{ratio:.3f}",
            f">= {SPEED_TARGET:.2f}",
            verdict(ratio, SPEED_TARGET),
        ],
        ["tokens/s (after the first token)", f"{local.decode_tokens_per_second:.1f}",
         f"{swarm.decode_tokens_per_second:.1f}", f"{decode_ratio:.3f}"],
        ["tokens/s (best run)", f"{local.best_tokens_per_second:.1f}", f"{swarm.best_tokens_per_second:.1f}",
         f"{swarm.best_tokens_per_second / local.best_tokens_per_second:.3f}"],
        both("per-token latency p50 (ms)", lambda result: result.gap_percentile(50)),
        both("per-token latency p90 (ms)", lambda result: result.gap_percentile(90)),
        both("time to first token (ms)", lambda result: result.median("first_token")),
        both("generate call (ms)", lambda result: result.median("seconds")),
        ["swarm overhead per token, p50 (ms)", "", milliseconds(overhead), f"{milliseconds(overhead / hops)} per hop"],
        ["same tokens in every run", "yes" if identical else "NO"],
    ]


def memory_rows(memory: dict[str, tuple[int, int]], missing_bytes: dict[str, int], full_span: str) -> list[list[str]]:
    """`missing_bytes[span]`: checkpoint bytes of the blocks that the server of `span` does not host."""
    header = ["memory after serving (PSS)", "server (MiB)", "+ DHT + p2pd (MiB)", "full - this (MiB)",
              "missing blocks (MiB)", "ratio", "target", "result"]
    rows, full = [header], memory[full_span][1]
    for span, missing in missing_bytes.items():
        own, total = memory[span]
        share = (full - total) / missing
        rows.append([f"server {span}", f"{own / MIB:.1f}", f"{total / MIB:.1f}", f"{(full - total) / MIB:.1f}",
                     f"{missing / MIB:.1f}", f"{share:.2f}", f">= {MEMORY_TARGET:.2f}", verdict(share, MEMORY_TARGET)])
    rows.append([f"full replica {full_span}", f"{memory[full_span][0] / MIB:.1f}", f"{full / MIB:.1f}"])
    return rows


def transport_rows(transport: dict[str, list[float]], payload_bytes: int) -> list[list[str]]:
    rows = [[f"round trip of {payload_bytes} bytes", "median (us)", "p90 (us)"]]
    for name, times in transport.items():
        rows.append([name, f"{percentile(times, 50) * 1e6:.0f}", f"{percentile(times, 90) * 1e6:.0f}"])
    difference = percentile(transport["swarm echo RPC"], 50) - percentile(transport["plain TCP echo"], 50)
    rows.append(["swarm framing + handler cost", f"{difference * 1e6:.0f}"])
    return rows


# Main


def transport_address(server: PeerProcess) -> str:
    return server.wait_for(READY_PATTERN, timeout=1.0).group(1)


def run_swarm_model(checkpoint: Path, swarm: LocalSwarm, work):
    """Calls `work(model)` with a client of `swarm`, then shuts the client's DHT down."""
    model = AutoDistributedModel.from_pretrained(checkpoint, initial_peers=swarm.initial_peers)
    try:
        return work(model)
    finally:
        model.remote.shutdown()


def private_copy(checkpoint: Path, directory: Path) -> Path:
    """A copy of the checkpoint in another file, so that no process shares its weight pages with another.

    Servers map their blocks' weights from the safetensors file; pages of one file mapped by several
    processes count in each one's PSS divided by their number, which would hide the full replica's weights.
    """
    copy = directory / checkpoint.name
    shutil.copytree(checkpoint, copy)
    return copy


def mapped_checkpoints(pid: int, directories: list[Path]) -> list[str]:
    """Files of the given checkpoint directories that a process still maps (PSS would share them)."""
    prefixes = tuple(str(directory.resolve()) for directory in directories)
    return [mapping.path for mapping in psutil.Process(pid).memory_maps() if mapping.path.startswith(prefixes)]


def measure_memory(checkpoint: Path, split: LocalSwarm, full_span: str, inputs: dict, max_new_tokens: int, log_dir):
    """Starts a full replica from a private copy of the checkpoint, runs one generation through it, then
    measures every server's PSS at the same moment; returns (PSS by span, the replica's run)."""
    with tempfile.TemporaryDirectory(prefix="bench-generate-replica-") as directory:
        replica_checkpoint = private_copy(checkpoint, Path(directory))
        print(f"starting a full replica {full_span} from {replica_checkpoint} ...", flush=True)
        with LocalSwarm(replica_checkpoint, [full_span], log_dir=log_dir and log_dir / "full") as full:
            run = run_swarm_model(replica_checkpoint, full, lambda model: generate_timed(model, inputs, max_new_tokens))
            servers = {span: server for span, server in zip(split.spans, split.servers)} | {full_span: full.servers[0]}
            memory = {span: tree_pss(server.pid) for span, server in servers.items()}
            shared = mapped_checkpoints(os.getpid(), [checkpoint, replica_checkpoint])
    if shared:
        print(f"warning: this process still maps {shared}; the servers' PSS is lowered by it")
    return memory, run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="measured runs of each, after one warm-up")
    parser.add_argument("--servers", type=int, default=3, help="servers splitting the blocks evenly")
    parser.add_argument("--threads", type=int, help="torch threads here and in each server (default: torch's)")
    parser.add_argument("--echo-rounds", type=int, default=2000, help="round trips timed per echo")
    parser.add_argument("--log-dir", type=Path, help="write the servers' output there (default: keep none)")
    return parser.parse_args(argv)


def compare_speed(checkpoint: Path, split: LocalSwarm, inputs: dict, args) -> dict[str, SpeedResult]:
    """Local `generate` against the swarm's; the local model is freed on return (its weights would share
    pages of the checkpoint with the servers, and lower their PSS)."""
    local = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def against(swarm_model):
        return measure_speed({"local": local, "swarm": swarm_model}, inputs, args.max_new_tokens, args.repeats)

    return run_swarm_model(checkpoint, split, against)


def report(speed, transport, memory, replica_run, checkpoint: Path, spans: list[str], full_span: str, args):
    reference = speed["local"].runs[0].new_tokens
    identical = same_tokens(speed) and torch.equal(replica_run.new_tokens, reference)
    print(f"\n== {checkpoint.name}: greedy, {args.max_new_tokens} new tokens, median of {args.repeats} runs ==")
    print(f"{machine_line()}, load average at end {os.getloadavg()[0]:.2f}\n")
    print(format_table(speed_rows(speed, identical, len(spans))))
    spread = max(result.spread for result in speed.values())
    if spread > NOISY_SPREAD:
        print(f"warning: tokens/s varied by up to {spread:.0%} between runs of one kind: other processes were "
              "competing for the CPUs, so these figures say little; rerun on a quiet machine")
    num_blocks = int(full_span.split(":")[1])
    print("\n" + format_table(memory_rows(memory, missing_block_bytes(checkpoint, spans, num_blocks), full_span)))
    hidden_size = AutoConfig.from_pretrained(checkpoint).hidden_size
    print("\n" + format_table(transport_rows(transport, hidden_size * 4)))


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so the swarm's processes are stopped
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)  # the servers inherit it
    if args.model is None:
        from swarm.smollm2 import smollm2_checkpoint

        args.model = smollm2_checkpoint()
    checkpoint = args.model.resolve()
    config = AutoConfig.from_pretrained(checkpoint)
    num_blocks = family_for(config).num_blocks(config)
    spans, full_span = even_spans(num_blocks, args.servers), f"0:{num_blocks}"
    inputs, tokenizer = prompt_inputs(checkpoint, args.prompt)
    print(f"model {checkpoint} ({num_blocks} blocks)" + (f", server logs in {args.log_dir}" if args.log_dir else ""))
    print(f"{machine_line()}, load average at start {os.getloadavg()[0]:.2f}")
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens, {args.max_new_tokens} new tokens, greedy")
    print(f"starting servers {', '.join(spans)} ...", flush=True)
    with LocalSwarm(checkpoint, spans, log_dir=args.log_dir and args.log_dir / "split") as split:
        speed = compare_speed(checkpoint, split, inputs, args)
        gc.collect()
        print("timing the transport ...", flush=True)
        transport = measure_transport(transport_address(split.servers[0]), config.hidden_size, args.echo_rounds)
        memory, replica_run = measure_memory(checkpoint, split, full_span, inputs, args.max_new_tokens, args.log_dir)
    if tokenizer is not None:
        print(f"\ngenerated: {tokenizer.decode(speed['local'].runs[0].new_tokens)!r}")
    report(speed, transport, memory, replica_run, checkpoint, spans, full_span, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
