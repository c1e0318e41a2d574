"""Where a token's time goes in the swarm: the client, each hop's round trip, and inside each server.

    python benchmarks/profile_swarm_step.py [--max-new-tokens 64] [--repeats 3] [--server-env NAME=VALUE ...]

Starts the same swarm as `bench_generate.py` (one server per span on 127.0.0.1), except that each
server runs `swarm.server`'s `main()` through a wrapper (the `TIMED_SERVER` code below; `swarm`
itself is unchanged) that times, inside the server process, each step request from the moment its
frame has been read to the moment its reply has been sent, the part before the reply is encoded
(checks, the hand-over to the compute thread, the family's `forward`), and `forward` within it. The
client relays every hop (`ClientConfig(push=False)`), so that it can time each hop's round trip, and
times its own `lm_head`; the local Hugging Face model times its `LlamaModel` body (embeddings, 30
layers, norm) and `lm_head`. Prints, for decode steps and for the
first token, the median and (in brackets) the 10th percentile over `--repeats` greedy generations
after one warm-up; on a busy machine the 10th percentile is the better guess at the cost when no
other process got in the way.

`--server-env` sets variables for the servers only; variables set before the command reach this
process (the local model and the client) too, e.g. `GOMP_SPINCOUNT=10000 python benchmarks/...`.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from timing import (
    DEFAULT_PROMPT,
    READY_PATTERN,
    even_spans,
    format_table,
    generate_timed,
    machine_line,
    percentile,
    prompt_inputs,
)
from transformers import AutoConfig, AutoModelForCausalLM

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.launch import PeerProcess, start_bootstrap
from swarm.models import family_for
from swarm.transport import Connection

# Runs `swarm.server`'s main() with timers around the transport's receive and send, the request handler
# and the family's forward; a `timings` request returns (and clears) what they measured for step requests.
TIMED_SERVER = r"""
import sys, time
from swarm import transport
from swarm.models.decoder import DecoderFamily
from swarm.server import handlers
from swarm.server.__main__ import main

steps = []
request = {"forward": 0.0}  # the request being served: the profile sends one at a time to each server

def receive(self, *args, _receive=transport.FrameReader.receive, **kwargs):
    fields, tensors = _receive(self, *args, **kwargs)
    request.update(received=time.perf_counter(), method=fields.get("method"), forward=0.0)
    return fields, tensors

def forward(self, *args, _forward=DecoderFamily.forward):
    started = time.perf_counter()
    try:
        return _forward(self, *args)
    finally:
        request["forward"] += time.perf_counter() - started

def reply(self, fields, tensors=None, _reply=transport.ConnectionContext.reply):
    started = time.perf_counter()
    _reply(self, fields, tensors)
    if request.get("method") == "step":
        steps.append({"service": time.perf_counter() - request["received"], "handler": started - request["received"],
                      "forward": request["forward"], "send": time.perf_counter() - started})

def rpc_timings(self, fields, tensors, context):
    reply = list(steps)
    steps.clear()
    return {"steps": reply}, {}

transport.FrameReader.receive, transport.ConnectionContext.reply = receive, reply
DecoderFamily.forward = forward
handlers.RequestHandler.rpc_timings = rpc_timings
sys.exit(main(sys.argv[1:]))
"""


class TimedSwarm:
    """A bootstrap peer and one timed server per span, on 127.0.0.1; stops them all on exit."""

    def __init__(self, checkpoint: Path, spans: list[str], env: dict[str, str]):
        self.checkpoint, self.spans, self.env = checkpoint, spans, env
        self.peers: list[PeerProcess] = []
        self.span_at: dict[str, str] = {}  # transport address -> span

    def __enter__(self) -> "TimedSwarm":
        try:
            bootstrap, self.initial_peers = start_bootstrap()
            self.peers.append(bootstrap)
            for span in self.spans:
                args = [str(self.checkpoint), "--blocks", span, "--host", "127.0.0.1"]
                args += ["--initial-peers", *self.initial_peers]
                self.peers.append(PeerProcess(["-c", TIMED_SERVER, *args], name=f"server {span}", env=self.env))
            for span, server in zip(self.spans, self.peers[1:]):
                self.span_at[server.wait_for(READY_PATTERN, timeout=180).group(1)] = span
        except BaseException:
            self.stop()
            raise
        return self

    def server_steps(self) -> dict[str, list[dict]]:
        """What each server measured since the last call, by span."""
        steps = {}
        for address, span in self.span_at.items():
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
    """Times every step request this process sends, by server address (wraps `Connection.request`)."""

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


def generate_runs(model, inputs: dict, args) -> dict[str, list[float]]:
    runs = [generate_timed(model, inputs, args.max_new_tokens) for _ in range(args.repeats)]
    return {"first_token": [run.first_token for run in runs], "gaps": [gap for run in runs for gap in run.gaps]}


def split_steps(values: list, per_run: int) -> tuple[list, list]:
    """Splits a flat list of per-forward values of several runs into (prefills, decode steps)."""
    runs = [values[start : start + per_run] for start in range(0, len(values), per_run)]
    return [run[0] for run in runs], [value for run in runs for value in run[1:]]


def profile_local(local, inputs: dict, args) -> dict[str, list[float]]:
    body, head = ModuleClock(local.model), ModuleClock(local.lm_head)
    generate_timed(local, inputs, args.max_new_tokens)
    body.times.clear(), head.times.clear()
    result = generate_runs(local, inputs, args)
    result["prefill_body"], result["body"] = split_steps(body.times, args.max_new_tokens)
    result["head"] = split_steps(head.times, args.max_new_tokens)[1]
    return result


def time_session_opening(model, max_length: int, repeats: int) -> dict[str, list[float]]:
    """Seconds to fetch the DHT records, to plan a route alone (with fresh records), and to open (plan, connect,
    `open` on each hop) and close a session."""
    fetches, plans, opens, closes = [], [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        model.remote.fetch_records()
        fetches.append(time.perf_counter() - started)
        started = time.perf_counter()
        model.remote.plan_route()
        plans.append(time.perf_counter() - started)
        started = time.perf_counter()
        with model.inference_session(max_length):
            opens.append(time.perf_counter() - started)
            started = time.perf_counter()
        closes.append(time.perf_counter() - started)
    return {"fetch_records": fetches, "plan_route": plans, "open": opens, "close": closes}


def profile_swarm(checkpoint: Path, swarm: TimedSwarm, inputs: dict, args):
    """Returns the client's timings, each hop's round trips and each server's step timings, the last
    two by span as (prefills, decode steps)."""
    relaying = ClientConfig(push=False)  # every hop a request of the client's, timed by it
    model = AutoDistributedModel.from_pretrained(checkpoint, initial_peers=swarm.initial_peers, client_config=relaying)
    head = ModuleClock(model.lm_head)
    try:
        generate_timed(model, inputs, args.max_new_tokens)
        swarm.server_steps()
        head.times.clear()
        with HopClock() as hops:
            result = generate_runs(model, inputs, args)
        servers = swarm.server_steps()
        result.update(time_session_opening(model, inputs["input_ids"].shape[1] + args.max_new_tokens, args.repeats))
    finally:
        model.remote.shutdown()
    per_run = args.max_new_tokens
    result["head"] = split_steps(head.times, per_run)[1]
    round_trips = {swarm.span_at[address]: split_steps(times, per_run) for address, times in hops.round_trips.items()}
    return result, round_trips, {span: split_steps(steps, per_run) for span, steps in servers.items()}


def ms(values: list[float]) -> str:
    """Median and 10th percentile in milliseconds."""
    return f"{statistics.median(values) * 1e3:.2f} ({percentile(values, 10) * 1e3:.2f})" if values else "-"


def difference_ms(minuend: list[float], subtrahend: list[float]) -> str:
    median = statistics.median(minuend) - statistics.median(subtrahend)
    low = percentile(minuend, 10) - percentile(subtrahend, 10)
    return f"{median * 1e3:.2f} ({low * 1e3:.2f})"


def decode_report(local: dict, swarm: dict, round_trips: dict, servers: dict, spans: list[str]) -> str:
    """`round_trips` and `servers`: decode steps by span."""

    def per_hop(name: str, value_of) -> list[str]:
        return [name, "", "", *(ms([value_of(step) for step in servers[span]]) for span in spans)]

    hops_total = [sum(times) for times in zip(*(round_trips[span] for span in spans))]
    rows = [
        ["per decode step, ms: median (p10)", "local HF", "swarm", *spans],
        ["token gap (generate loop)", ms(local["gaps"]), ms(swarm["gaps"])],
        ["model body: local LlamaModel / swarm sum of hops", ms(local["body"]), ms(hops_total)],
        ["rest of the client (head, embeddings, generate)", difference_ms(local["gaps"], local["body"]),
         difference_ms(swarm["gaps"], hops_total)],
        ["  of which lm_head", ms(local["head"]), ms(swarm["head"])],
        ["hop round trip seen by the client", "", "", *(ms(round_trips[span]) for span in spans)],
        per_hop("server: frame read -> reply sent (*)", lambda step: step["service"]),
        per_hop("  family.forward (the blocks)", lambda step: step["forward"]),
        per_hop("  rest before the reply (checks, thread hand-over)", lambda step: step["handler"] - step["forward"]),
        per_hop("  encoding + sending the reply", lambda step: step["send"]),
        ["round trip - family.forward (wire, codec, wake-ups)", "", "",
         *(difference_ms(round_trips[span], [step["forward"] for step in servers[span]]) for span in spans)],
    ]
    note = "(*) ends when `sendmsg` returns, which can be after the client has the reply if the server lost its core"
    return format_table(rows) + "\n" + note


def first_token_report(local: dict, swarm: dict, round_trips: dict, servers: dict, spans: list[str]) -> str:
    """`round_trips` and `servers`: prefills by span."""
    forwards = {span: [step["forward"] for step in servers[span]] for span in spans}
    rows = [
        ["first token, ms: median (p10)", "local HF", "swarm", *spans],
        ["time to first token (generate call)", ms(local["first_token"]), ms(swarm["first_token"])],
        ["prefill: local LlamaModel / hop round trip", ms(local["prefill_body"]), "",
         *(ms(round_trips[span]) for span in spans)],
        ["  family.forward on the server", "", "", *(ms(forwards[span]) for span in spans)],
        ["opening a session (route, connections, `open`)", "", ms(swarm["open"])],
        ["  of which planning the route", "", ms(swarm["plan_route"])],
        ["fetching the DHT records (when the cached are stale)", "", ms(swarm["fetch_records"])],
        ["closing a session", "", ms(swarm["close"])],
    ]
    return format_table(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="measured generations of each, after one warm-up")
    parser.add_argument("--servers", type=int, default=3, help="servers splitting the blocks evenly")
    parser.add_argument("--server-env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="environment of the servers only, e.g. GOMP_SPINCOUNT=10000")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so the swarm's processes are stopped
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.model is None:
        from swarm.smollm2 import smollm2_checkpoint

        args.model = smollm2_checkpoint()
    checkpoint = args.model.resolve()
    config = AutoConfig.from_pretrained(checkpoint)
    spans = even_spans(family_for(config).num_blocks(config), args.servers)
    inputs, _ = prompt_inputs(checkpoint, args.prompt)
    local = profile_local(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval(), inputs, args)
    server_env = dict(item.split("=", 1) for item in args.server_env)
    with TimedSwarm(checkpoint, spans, server_env) as swarm:
        swarm_times, round_trips, servers = profile_swarm(checkpoint, swarm, inputs, args)
    prefill_trips, decode_trips = ({span: steps[part] for span, steps in round_trips.items()} for part in (0, 1))
    prefill_servers, decode_servers = ({span: steps[part] for span, steps in servers.items()} for part in (0, 1))
    print(f"\n{checkpoint.name}: {args.max_new_tokens} new tokens x {args.repeats} runs; {machine_line()}", end="")
    print(f"; servers only: {' '.join(args.server_env)}" if args.server_env else "", end="\n\n")
    print(decode_report(local, swarm_times, decode_trips, decode_servers, spans), end="\n\n")
    print(first_token_report(local, swarm_times, prefill_trips, prefill_servers, spans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
