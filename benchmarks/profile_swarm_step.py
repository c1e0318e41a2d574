"""Where a token's time goes in the swarm: the client, each hop's round trip, and inside each server.

    python benchmarks/profile_swarm_step.py [--max-new-tokens 64] [--repeats 3] [--threads N]

Starts the same swarm as `bench_generate.py` (3 servers on 127.0.0.1), except that each server runs
`python -m swarm.server` through a small wrapper that times, in the server process, every step request
from the moment its frame is read to the moment its reply is sent, and the family's `forward` inside
it (the patching lives in this file; `swarm` itself is unchanged). The client times each hop's round
trip; the local Hugging Face model times its 30 decoder layers. Prints medians over the decode steps
of `--repeats` generations, after one warm-up of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import READY_PATTERN, TokenClock, even_spans, format_table, percentile, prompt_inputs  # noqa: E402

from swarm import AutoDistributedModel  # noqa: E402
from swarm.launch import PeerProcess, start_bootstrap  # noqa: E402
from swarm.models import family_for  # noqa: E402
from swarm.transport import Connection  # noqa: E402

# Runs `swarm.server`'s main() with timers around the transport's receive and send, the request handler
# and the family's forward; a `timings` request returns (and clears) what they measured for step requests.
TIMED_SERVER = r"""
import sys, threading, time
from swarm import transport
from swarm.models.decoder import DecoderOnlyFamily
from swarm.server import handlers
from swarm.server.__main__ import main

local, steps = threading.local(), []

def receive_message(sock, _receive=transport.receive_message):
    fields, tensors = _receive(sock)
    local.received, local.method, local.forward = time.perf_counter(), fields.get("method"), 0.0
    return fields, tensors

def forward(self, *args, _forward=DecoderOnlyFamily.forward):
    started = time.perf_counter()
    try:
        return _forward(self, *args)
    finally:
        local.forward += time.perf_counter() - started

def call(self, fields, tensors, context, _call=handlers.RequestHandler.__call__):
    started = time.perf_counter()
    try:
        return _call(self, fields, tensors, context)
    finally:
        local.handler = time.perf_counter() - started

def try_send(*args, _send=transport._try_send):
    started = time.perf_counter()
    result = _send(*args)
    if getattr(local, "method", None) == "step":
        steps.append({"service": time.perf_counter() - local.received, "handler": local.handler,
                      "forward": local.forward, "send": time.perf_counter() - started})
    return result

def rpc_timings(self, fields, tensors, context):
    reply = list(steps)
    steps.clear()
    return {"steps": reply}, {}

transport.receive_message, transport._try_send = receive_message, try_send
DecoderOnlyFamily.forward, handlers.RequestHandler.__call__ = forward, call
handlers.RequestHandler.rpc_timings = rpc_timings
sys.exit(main(sys.argv[1:]))
"""


class TimedSwarm:
    """A bootstrap peer and timed servers; stops them all on exit."""

    def __init__(self, checkpoint: Path, spans: list[str]):
        self.checkpoint, self.spans = checkpoint, spans
        self.peers: list[PeerProcess] = []
        self.addresses: dict[str, str] = {}  # transport address -> span

    def __enter__(self) -> "TimedSwarm":
        try:
            bootstrap, self.initial_peers = start_bootstrap()
            self.peers.append(bootstrap)
            for span in self.spans:
                args = [str(self.checkpoint), "--blocks", span, "--host", "127.0.0.1", "--initial-peers", *self.initial_peers]
                self.peers.append(PeerProcess(["-c", TIMED_SERVER, *args], name=f"server {span}"))
            for span, server in zip(self.spans, self.peers[1:]):
                self.addresses[server.wait_for(READY_PATTERN, timeout=180).group(1)] = span
        except BaseException:
            self.stop()
            raise
        return self

    def server_steps(self) -> dict[str, list[dict]]:
        """What each server measured since the last call, by span."""
        steps = {}
        for address, span in self.addresses.items():
            connection = Connection(address, timeout=10)
            try:
                steps[span] = connection.request({"method": "timings"})[0]["steps"]
            finally:
                connection.close()
        return steps

    def stop(self):
        for peer in self.peers:
            peer.stop()

    def __exit__(self, *exc_info):
        self.stop()


class HopClock:
    """Times every step request the client sends, by server address (wraps `Connection.request`)."""

    def __init__(self):
        self.round_trips: dict[str, list[float]] = defaultdict(list)
        self._request = Connection.request

    def __enter__(self) -> "HopClock":
        clock, request = self, self._request

        def timed_request(connection, fields, tensors=None, timeout=None):
            started = time.perf_counter()
            reply = request(connection, fields, tensors, timeout)
            if fields.get("method") == "step":
                clock.round_trips[connection.address].append(time.perf_counter() - started)
            return reply

        Connection.request = timed_request
        return self

    def __exit__(self, *exc_info):
        Connection.request = self._request


class ModuleClock:
    """Times every call of a module with forward hooks."""

    def __init__(self, module: torch.nn.Module):
        self.times: list[float] = []
        module.register_forward_pre_hook(lambda *_: setattr(self, "_started", time.perf_counter()))
        module.register_forward_hook(lambda *_: self.times.append(time.perf_counter() - self._started))


def generate_gaps(model, inputs: dict, max_new_tokens: int) -> list[float]:
    clock = TokenClock()
    with torch.inference_mode():
        model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, streamer=clock)
    return [later - earlier for earlier, later in zip(clock.token_times, clock.token_times[1:])]


def decode_steps(values: list, per_run: int, repeats: int) -> list:
    """Drops each run's prefill (its first call) from a flat list of per-call values."""
    return [value for run in range(repeats) for value in values[run * per_run + 1 : (run + 1) * per_run]]


def median_ms(values: list[float]) -> str:
    """Median and 10th percentile in ms: the low percentile shows the cost when no other process got in the way."""
    if not values:
        return "-"
    return f"{statistics.median(values) * 1e3:.2f} ({percentile(values, 10) * 1e3:.2f})"


def difference_ms(minuend: list[float], subtrahend: list[float]) -> str:
    median = statistics.median(minuend) - statistics.median(subtrahend)
    low = percentile(minuend, 10) - percentile(subtrahend, 10)
    return f"{median * 1e3:.2f} ({low * 1e3:.2f})"


def profile_local(local, inputs: dict, args) -> dict[str, list[float]]:
    layers, head = ModuleClock(local.model), ModuleClock(local.lm_head)
    generate_gaps(local, inputs, args.max_new_tokens)
    layers.times.clear(), head.times.clear()
    gaps = [gap for _ in range(args.repeats) for gap in generate_gaps(local, inputs, args.max_new_tokens)]
    per_run = args.max_new_tokens
    return {"gaps": gaps, "blocks": decode_steps(layers.times, per_run, args.repeats),
            "head": decode_steps(head.times, per_run, args.repeats)}


def profile_swarm(checkpoint: Path, swarm: TimedSwarm, inputs: dict, args):
    model = AutoDistributedModel.from_pretrained(checkpoint, initial_peers=swarm.initial_peers)
    head = ModuleClock(model.lm_head)
    try:
        generate_gaps(model, inputs, args.max_new_tokens)
        swarm.server_steps()
        head.times.clear()
        with HopClock() as hops:
            gaps = [gap for _ in range(args.repeats) for gap in generate_gaps(model, inputs, args.max_new_tokens)]
        servers = swarm.server_steps()
    finally:
        model.remote.shutdown()
    per_run = args.max_new_tokens
    round_trips = {swarm.addresses[address]: decode_steps(times, per_run, args.repeats) for address, times in hops.round_trips.items()}
    servers = {span: decode_steps(steps, per_run, args.repeats) for span, steps in servers.items()}
    return {"gaps": gaps, "head": decode_steps(head.times, per_run, args.repeats)}, round_trips, servers


def report(local: dict, swarm: dict, round_trips: dict, servers: dict, spans: list[str]) -> str:
    hops_total = [sum(times) for times in zip(*(round_trips[span] for span in spans))]
    gaps = swarm["gaps"]
    rows = [
        ["per decode step, ms: median (p10)", "local HF", "swarm", *spans],
        ["token gap (generate loop)", median_ms(local["gaps"]), median_ms(gaps)],
        ["model body: local LlamaModel / swarm sum of hop round trips", median_ms(local["blocks"]), median_ms(hops_total)],
        ["rest of the client (head, embeddings, generate)", difference_ms(local["gaps"], local["blocks"]),
         difference_ms(gaps, hops_total)],
        ["  of which lm_head", median_ms(local["head"]), median_ms(swarm["head"])],
        ["hop round trip seen by the client", "", "", *(median_ms(round_trips[span]) for span in spans)],
        ["server: frame read -> reply sent (*)", "", "", *(median_ms([s["service"] for s in servers[span]]) for span in spans)],
        ["  family.forward (the blocks)", "", "", *(median_ms([s["forward"] for s in servers[span]]) for span in spans)],
        ["  rest of the handler (checks, session)", "", "", *(median_ms([s["handler"] - s["forward"] for s in servers[span]]) for span in spans)],
        ["  encoding + sending the reply", "", "", *(median_ms([s["send"] for s in servers[span]]) for span in spans)],
        ["round trip - family.forward (transport, handler, wake-ups)", "", "",
         *(difference_ms(round_trips[span], [s["forward"] for s in servers[span]]) for span in spans)],
    ]
    note = "(*) ends when `sendmsg` returns; the client may already hold the reply if the server thread lost its core"
    return format_table(rows) + "\n" + note


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads of this process and of each server")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if args.model is None:
        from swarm.smollm2 import smollm2_checkpoint

        args.model = smollm2_checkpoint()
    checkpoint = args.model.resolve()
    config = AutoConfig.from_pretrained(checkpoint)
    spans = even_spans(family_for(config).num_blocks(config), args.servers)
    inputs, _ = prompt_inputs(checkpoint, args.prompt)
    local = profile_local(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval(), inputs, args)
    with TimedSwarm(checkpoint, spans) as swarm:
        swarm_times, round_trips, servers = profile_swarm(checkpoint, swarm, inputs, args)
    print(f"\n{checkpoint.name}, {torch.get_num_threads()} torch threads, {args.max_new_tokens} new tokens x {args.repeats}\n")
    print(report(local, swarm_times, round_trips, servers, spans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
