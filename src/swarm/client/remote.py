"""The client's view of the remote blocks: finding servers, measuring them, and running hidden states
through them, with failover.

`RemoteBlocks` keeps the swarm's records, the measured latencies and the bans, and runs forward passes.
`InferenceSession` (in `swarm.client.session`, which builds on this module) keeps one server-side session per hop.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import hivemind
import torch

from swarm.client.config import ClientConfig
from swarm.client.retry import is_retriable
from swarm.client.routing import Hop, RoutingPreferences, missing_blocks, plan_route, usable_servers
from swarm.client.verify import Verifier, agree
from swarm.errors import (
    BadReplyError,
    ConfigurationError,
    InternalServerError,
    MissingBlocksError,
    PeerError,
    ServerBusyError,
    SessionExpiredError,
    SwarmUnavailableError,
)
from swarm.handshake import check_answer, hello_request
from swarm.models.base import LAYER_OUTPUT
from swarm.network import start_dht
from swarm.quantization import PRECISION_BITS
from swarm.records import ServerRecord, fetch_records
from swarm.spans import BlockSpan
from swarm.transport import Connection, TransportLimits
from swarm.wire import DTYPES, is_int

LAYER_OUTPUTS = LAYER_OUTPUT.format("")  # the prefix of blocks' own outputs in a reply

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


class RemoteBlocks:
    """Blocks [0, num_blocks) of `model_name`, served by the swarm that `config.initial_peers` lead to."""

    def __init__(
        self,
        config: ClientConfig,
        model_name: str,
        num_blocks: int,
        dht: hivemind.DHT | None = None,
        phases: tuple[str, ...] = (),
    ):
        self.config = config
        self.model_name = model_name
        self.span = BlockSpan(0, num_blocks)
        self.phases = tuple(phases)  # the passes of a step over a route (see `ModelFamily.phases`); () for one
        self.dht = dht or start_dht(config.initial_peers, client_mode=True, swarm_key=config.swarm_key)
        self.latencies: dict[str, float] = {}
        self.request_rows: dict[str, int] = {}  # peer id -> rows of hidden states it takes per request (its info)
        self.banned_until: dict[str, float] = {}
        self.relayed_links: dict[tuple[str, str], float] = {}  # (peer id, next peer id) -> until when the client
        # relays between the two, because the first could not push to the second
        self._connections: dict[str, Connection] = {}
        self._lock = threading.Lock()
        self._records_time = -math.inf
        self.records_by_block: list[list[ServerRecord]] = []
        self.last_route: list[Hop] = []  # the hops of the inference session that closed last
        self.verifier = Verifier(config.verify) if config.verify is not None else None
        self.wait_for_coverage(self.span)

    # Finding and measuring servers

    def fetch_records(self) -> list[list[ServerRecord]]:
        self.records_by_block = fetch_records(self.dht, self.model_name, len(self.span))
        self._records_time = time.monotonic()
        return self.records_by_block

    def preferences(self) -> RoutingPreferences:
        now = time.monotonic()
        banned = {peer_id for peer_id, until in self.banned_until.items() if until > now}
        return RoutingPreferences(
            latencies=dict(self.latencies),
            excluded=banned | set(self.config.excluded_peers),
            pinned=set(self.config.pinned_peers),
            min_bits=PRECISION_BITS[self.config.min_precision] if self.config.min_precision else 0,
            wire_dtype=self.config.wire_dtype,
        )

    def wait_for_coverage(self, span: BlockSpan, timeout: float | None = None) -> None:
        """Polls the DHT until usable servers cover `span`, or raises `MissingBlocksError`."""
        timeout = self.config.coverage_timeout if timeout is None else timeout
        started = time.monotonic()
        if time.monotonic() - self._records_time > self.config.records_max_age:
            self.fetch_records()
        while missing := missing_blocks(self.records_by_block, span, self.preferences()):
            waited = time.monotonic() - started
            if waited >= timeout:
                raise MissingBlocksError(self.model_name, missing, waited, self.config.min_precision)
            time.sleep(min(self.config.poll_period, timeout - waited))
            self.fetch_records()

    def plan_route(self, span: BlockSpan | None = None, timeout: float | None = None) -> list[Hop]:
        """The fastest route over `span` now, after pinging servers whose latency is unknown."""
        span = span or self.span
        deadline = time.monotonic() + (self.config.coverage_timeout if timeout is None else timeout)
        while True:
            self.wait_for_coverage(span, max(0.0, deadline - time.monotonic()))
            self.measure_latencies(usable_servers(self.records_by_block, self.preferences()))
            try:
                route = plan_route(self.records_by_block, span, self.preferences())
                break
            except ValueError:  # servers that did not answer their ping were left out: wait for others
                self._records_time = -math.inf
        logger.info(f"Route for {self.model_name} blocks {span}: " + ", ".join(map(str, route)))
        return route

    def measure_latencies(self, servers: list[ServerRecord], again: bool = False):
        """Pings servers (in parallel) and folds the round trips into their moving averages."""
        servers = [server for server in servers if again or server.peer_id not in self.latencies]
        if not servers:
            return
        with ThreadPoolExecutor(max_workers=min(16, len(servers))) as pool:
            for server, latency in zip(servers, pool.map(self.ping, servers)):
                if latency is None:
                    self.ban(server, "it did not answer a ping")
                    continue
                previous = self.latencies.get(server.peer_id, latency)
                self.latencies[server.peer_id] = previous + self.config.latency_smoothing * (latency - previous)

    def ping(self, server: ServerRecord) -> float | None:
        """Round-trip seconds of an `info` request to `server` (which also says its limits), or None if it fails."""
        try:
            connection = self.connection(server)
            started = time.perf_counter()
            info, _ = connection.request({"method": "info"}, timeout=self.config.ping_timeout)
            seconds = time.perf_counter() - started
        except PeerError:
            return None
        if is_int(info.get("max_request_tokens")) and info["max_request_tokens"] > 0:
            self.request_rows[server.peer_id] = info["max_request_tokens"]
        return seconds

    def max_request_rows(self) -> int | None:
        """The fewest rows of hidden states (batch x positions) that a server met so far takes in one request: a
        step cut to fit them fits any route failover may switch to."""
        return min(self.request_rows.values(), default=None)

    def ban(self, server: ServerRecord, reason: str, duration: float | None = None):
        duration = self.config.ban_duration if duration is None else duration
        logger.warning(f"Leaving out {server.address} ({server.peer_id[-8:]}) for {duration:.0f} s: {reason}")
        self.banned_until[server.peer_id] = time.monotonic() + duration
        self.latencies.pop(server.peer_id, None)
        with self._lock:
            connection = self._connections.pop(server.peer_id, None)
        if connection is not None:
            connection.close()

    def connection(self, server: ServerRecord) -> Connection:
        """A shared connection to `server` for stateless requests."""
        with self._lock:
            connection = self._connections.get(server.peer_id)
            if connection is not None and not connection.closed:
                return connection
        connection = self.open_connection(server)
        with self._lock:
            previous = self._connections.get(server.peer_id)
            if previous is not None and not previous.closed:
                connection.close()
                return previous
            self._connections[server.peer_id] = connection
            return connection

    def open_connection(self, server: ServerRecord) -> Connection:
        """A new connection to `server`, which has proven it is the peer that signed its record (and holds the
        swarm key of a private swarm): see `swarm.handshake`."""
        connection = Connection(server.address, self.config.connect_timeout, self.transport_limits, self.config.source_host)
        try:
            request = hello_request(self.config.swarm_key)
            answer, _ = connection.request(request, timeout=self.config.connect_timeout)
            check_answer(request, answer, server.peer_id, server.address, self.config.swarm_key)
        except BaseException:
            connection.close()
            raise
        return connection

    @property
    def transport_limits(self) -> TransportLimits:
        return TransportLimits(max_message_bytes=self.config.max_reply_bytes)

    def request_timeout(self, tokens: int) -> float:
        return self.config.step_timeout * max(1, math.ceil(tokens / 256))

    # Running blocks

    def forward(self, tensors: Tensors, span: BlockSpan | None = None) -> Tensors:
        """Runs blocks `span` (default: all) without a cache, re-routing around servers that fail. A hop's
        reply tensors replace the inputs of the same name for the next hop (hidden states); the others travel
        unchanged (position ids, masks). Blocks' own outputs (`LAYER_OUTPUT`) are kept here and returned too. Floating-point tensors come back in the caller's dtype.

        A model whose steps make a round trip keeps state on its servers between the two passes: it runs
        each step in an `InferenceSession` instead."""
        span = span or self.span
        if self.phases:
            raise ConfigurationError("a model whose steps make a round trip runs them in inference sessions")
        tensors = {name: tensor for name, tensor in tensors.items() if tensor is not None}
        caller_dtypes = {name: tensor.dtype for name, tensor in tensors.items()}
        budget, block, kept = self.config.retry.start(), span.start, {}
        route = self.plan_route(span)
        while block < span.end:
            hop = route[0]
            fields = {"method": "forward", "start": hop.span.start, "end": hop.span.end}
            try:
                _, outputs = run_hop(self.connection(hop.server), hop, fields, tensors, self.request_timeout(tokens_of(tensors)))
                if self.verifier is not None and self.verifier.should_check():
                    self.check_forward(hop, fields, tensors, outputs)
            except Exception as error:
                if not is_retriable(error):
                    raise
                route = self.recover(hop, error, budget, BlockSpan(block, span.end))
                continue
            kept.update((name, tensor) for name, tensor in outputs.items() if name.startswith(LAYER_OUTPUTS))
            outputs = {name: tensor for name, tensor in outputs.items() if not name.startswith(LAYER_OUTPUTS)}
            tensors.update(outputs)
            block, route = hop.span.end, route[1:]
        result = {name: tensors[name] for name in outputs} | kept
        return {name: tensor.to(caller_dtypes.get(name, tensor.dtype)) for name, tensor in result.items()}

    def check_forward(self, hop: Hop, fields: dict, tensors: Tensors, outputs: Tensors):
        """Has another server of `hop`'s blocks run the same forward; on disagreement a third decides (see
        `swarm.client.verify`). A checker that fails is left out, and the check skipped."""
        checkers = self.checkers(hop)
        opinions = []
        for checker in checkers[:3]:
            try:
                connection = self.connection(checker)
                _, output = run_hop(connection, Hop(checker, hop.span, hop.wire_dtype), fields, tensors, self.request_timeout(tokens_of(tensors)))
            except PeerError as error:
                self.ban(checker, f"it failed while checking another server: {error}")
                continue
            opinions.append((checker, output))
            if len(opinions) == 1 and agree(output, outputs, self.verifier.config.tolerance):
                return
            if len(opinions) == 2:
                break
        if opinions:
            self.verifier.judge(hop, opinions[0][0], opinions[1:], opinions[0][1], outputs, self)

    def checkers(self, hop: Hop) -> list[ServerRecord]:
        """Servers that could check `hop` (other than its own, and than those left out)."""
        excluded = self.preferences().excluded | {hop.server.peer_id}
        return self.verifier.checkers(self.records_by_block, hop.span, excluded)

    def recover(self, hop: Hop, error: Exception, budget, span: BlockSpan) -> list[Hop]:
        """Leaves the failed server out (for `ban_duration`; for `busy_duration` if it was busy; not at all if it
        had only lost a session), waits out the retry delay, and plans a new route over `span`. A server's
        internal error is tried on one other server: the same request failing on a second raises at once."""
        if isinstance(error, InternalServerError):
            if budget.internal_error is not None:
                raise InternalServerError(
                    f"two servers failed on the same request, so it is not tried again: {budget.internal_error}; {error}"
                ) from error
            budget.internal_error = error
        if isinstance(error, ServerBusyError):
            self.ban(hop.server, f"busy: {error}", self.config.busy_duration)
        elif not isinstance(error, SessionExpiredError):
            self.ban(hop.server, f"{type(error).__name__}: {error}")
        delay = budget.next_delay()
        if delay is None:
            raise SwarmUnavailableError(
                f"could not serve blocks {span} of {self.model_name} after {budget.failures} failures "
                f"(last: {error})"
            ) from error
        time.sleep(delay)
        remaining = self.config.retry.total_timeout - (time.monotonic() - budget.first_failure)
        try:
            return self.plan_route(span, timeout=max(0.0, remaining))
        except MissingBlocksError as missing:
            raise SwarmUnavailableError(
                f"could not serve blocks {span} of {self.model_name}: {missing} (after: {error})"
            ) from error

    def shutdown(self):
        with self._lock:
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()
        self.dht.shutdown()


def tokens_of(tensors: Tensors) -> int:
    """Positions in a request, for its timeout: the second dimension of its largest tensor."""
    largest = max(tensors.values(), key=lambda tensor: tensor.numel())
    return largest.shape[1] if largest.ndim > 1 else 1


def run_hop(connection: Connection, hop: Hop, fields: dict, tensors: Tensors, timeout: float) -> tuple[dict, Tensors]:
    """One request to one hop. Floating-point tensors travel in the hop's dtype; None values stay home. A reply
    that is not what was asked for (`check_reply`) is a `BadReplyError`: that server's fault."""
    sent = in_travel_dtype(hop, tensors)
    reply_fields, reply_tensors = connection.request(fields, sent, timeout=timeout)
    check_hop_reply(connection, hop, fields, sent, reply_fields, reply_tensors)
    return reply_fields, reply_tensors


def in_travel_dtype(hop: Hop, tensors: Tensors) -> Tensors:
    """`tensors` as they travel to `hop`: floating-point ones in its travel dtype, None values left out."""
    dtype = DTYPES.get(hop.travel_dtype)
    return {
        name: tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        for name, tensor in tensors.items()
        if tensor is not None
    }


def check_hop_reply(connection: Connection, hop: Hop, fields: dict, sent: Tensors, reply_fields: dict, reply: Tensors):
    """Closes the connection and raises `BadReplyError` if the reply is not what was asked for (`check_reply`)."""
    problem = check_reply(fields, sent, reply_fields, reply, DTYPES.get(hop.travel_dtype))
    if problem is not None:
        connection.close()
        raise BadReplyError(f"{hop.server.address} sent a reply that {problem}")


def check_reply(fields: dict, sent: Tensors, reply_fields: dict, reply: Tensors, travel_dtype) -> str | None:
    """What is wrong with a reply to a `forward` or `step` request, or None. A pass through blocks returns tensors
    named and shaped as the ones it was sent (the hidden states), the outputs of the blocks it was asked for, and
    for a step the session's length; a step of a round-trip model (`phases`) returns what its family makes."""
    if fields.get("method") not in ("forward", "step"):
        return None
    if fields.get("method") == "step" and not (is_int(reply_fields.get("length")) and reply_fields["length"] >= 0):
        return f"has no valid 'length' ({reply_fields.get('length')!r})"
    if not reply:
        return "holds no tensors"
    for name, tensor in reply.items():
        if tensor.is_floating_point() and travel_dtype is not None and tensor.dtype != travel_dtype:
            return f"holds {name} in {tensor.dtype}, not the {travel_dtype} it was asked for"
    if "phases" in fields:
        return None
    start, end = fields.get("start"), fields.get("end")
    asked = set(sent["output_layers"].tolist()) if "output_layers" in sent else set()
    for name, tensor in reply.items():
        if name.startswith(LAYER_OUTPUTS):
            index = name[len(LAYER_OUTPUTS) :]
            if not (index.isdigit() and int(index) in asked and (start is None or start <= int(index) < end)):
                return f"holds {name}, which was not asked for"
            expected = sent.get("hidden_states")
        elif name in sent:
            expected = sent[name]
        else:
            return f"holds {name}, which was not asked for"
        if expected is not None and tensor.shape != expected.shape:
            return f"holds {name} of shape {tuple(tensor.shape)}, not {tuple(expected.shape)}"
    if "hidden_states" in sent and "hidden_states" not in reply:
        return "holds no hidden_states"
    return None
