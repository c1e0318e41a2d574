"""The client's view of the remote blocks: finding servers, forward passes and inference sessions.

`RemoteBlocks` runs hidden states through a route of servers covering the model's blocks.
`InferenceSession` keeps one server-side session per hop, so each step sends only the new tokens.
"""

from __future__ import annotations

import logging
import threading
import time

import hivemind
import torch

from swarm.client.config import ClientConfig
from swarm.client.routing import Hop, missing_blocks, plan_route
from swarm.errors import MissingBlocksError
from swarm.records import ServerRecord, fetch_records
from swarm.spans import BlockSpan
from swarm.transport import Connection
from swarm.wire import DTYPES

Tensors = dict[str, torch.Tensor]

logger = logging.getLogger(__name__)


class RemoteBlocks:
    """Blocks [0, num_blocks) of `model_name`, served by the swarm that `config.initial_peers` lead to."""

    def __init__(self, config: ClientConfig, model_name: str, num_blocks: int, dht: hivemind.DHT | None = None):
        self.config = config
        self.model_name = model_name
        self.span = BlockSpan(0, num_blocks)
        self.dht = dht or hivemind.DHT(initial_peers=config.initial_peers, client_mode=True, start=True)
        self._connections: dict[str, Connection] = {}
        self._lock = threading.Lock()
        self.records_by_block = self.wait_for_coverage()

    def fetch_records(self) -> list[list[ServerRecord]]:
        return fetch_records(self.dht, self.model_name, len(self.span))

    def wait_for_coverage(self) -> list[list[ServerRecord]]:
        """Polls the DHT until online servers cover every block, or raises `MissingBlocksError`."""
        started = time.monotonic()
        while True:
            records_by_block = self.fetch_records()
            missing = missing_blocks(records_by_block, self.span)
            waited = time.monotonic() - started
            if not missing:
                return records_by_block
            if waited >= self.config.coverage_timeout:
                raise MissingBlocksError(self.model_name, missing, waited)
            time.sleep(self.config.poll_period)

    def plan_route(self, span: BlockSpan | None = None) -> list[Hop]:
        self.records_by_block = self.wait_for_coverage()
        route = plan_route(self.records_by_block, span or self.span)
        logger.info(f"Route for {self.model_name} blocks {span or self.span}: " + ", ".join(map(str, route)))
        return route

    def forward(self, tensors: Tensors) -> Tensors:
        """Runs every block without a cache (see `run_route` for how tensors flow)."""
        route = plan_route(self.records_by_block, self.span)
        requests = [
            (self._connection(hop.server.address), {"method": "forward", "start": hop.span.start, "end": hop.span.end})
            for hop in route
        ]
        _, outputs = run_route(route, requests, tensors)
        return outputs

    def _connection(self, address: str) -> Connection:
        with self._lock:
            connection = self._connections.get(address)
            if connection is None or connection.closed:
                connection = Connection(address, self.config.connect_timeout)
                connection.timeout = self.config.request_timeout
                self._connections[address] = connection
            return connection

    def inference_session(self, max_length: int) -> "InferenceSession":
        return InferenceSession(self, max_length)

    def shutdown(self):
        with self._lock:
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()
        self.dht.shutdown()


class InferenceSession:
    """A stepwise session over a route: each server keeps its blocks' cache for this session."""

    def __init__(self, remote: RemoteBlocks, max_length: int):
        self.remote = remote
        self.max_length = max_length
        self.position = 0  # positions the servers have processed
        self.output_ids: torch.Tensor | None = None  # tokens of the conversation so far (for generate)
        self.output_mask: torch.Tensor | None = None  # their attention mask, None while all ones
        self.skip_tokens = 0  # leading tokens of the next step that the servers have already seen
        self._hypo_ids: torch.Tensor | None = None  # row order for the servers' caches at the next step
        self.route: list[Hop] = []
        self._server_sessions: list[tuple[Hop, Connection, str]] = []
        self.closed = False

    def __enter__(self) -> "InferenceSession":
        self.route = self.remote.plan_route()
        config = self.remote.config
        for hop in self.route:
            connection = Connection(hop.server.address, config.connect_timeout)
            connection.timeout = config.request_timeout
            fields = {"method": "open", "start": hop.span.start, "end": hop.span.end, "max_length": self.max_length}
            reply, _ = connection.request(fields)
            self._server_sessions.append((hop, connection, reply["session_id"]))
        return self

    def reorder(self, hypo_ids: torch.Tensor):
        """Reorders the rows of every server's cache at the next step (composes with a pending reorder)."""
        hypo_ids = hypo_ids.long().cpu()
        self._hypo_ids = hypo_ids if self._hypo_ids is None else self._hypo_ids[hypo_ids]

    def take_hypo_ids(self) -> torch.Tensor | None:
        hypo_ids, self._hypo_ids = self._hypo_ids, None
        return hypo_ids

    def step(self, tensors: Tensors) -> Tensors:
        """Sends the new positions through every hop (see `run_route`); returns the last hop's outputs."""
        requests = [
            (connection, {"method": "step", "session_id": session_id}) for _, connection, session_id in self._server_sessions
        ]
        reply, outputs = run_route(self.route, requests, tensors)
        self.position = reply["length"]
        return outputs

    def close(self):
        if self.closed:
            return
        self.closed = True
        for _, connection, session_id in self._server_sessions:
            try:
                connection.request({"method": "close", "session_id": session_id})
            except Exception as error:
                logger.debug(f"Could not close session {session_id} on {connection.address}: {error}")
            connection.close()

    def __exit__(self, *exc_info):
        self.close()


def run_route(route: list[Hop], requests: list[tuple[Connection, dict]], tensors: Tensors) -> tuple[dict, Tensors]:
    """Sends `tensors` through the hops in order. A hop's reply tensors replace the inputs of the same name
    for the next hop (hidden states), the others travel unchanged (position ids, masks). Floating-point
    tensors travel in each server's dtype and come back in the caller's. None values are left out."""
    current = {name: tensor for name, tensor in tensors.items() if tensor is not None}
    caller_dtypes = {name: tensor.dtype for name, tensor in current.items()}
    reply: dict = {}
    for hop, (connection, fields) in zip(route, requests):
        server_dtype = DTYPES.get(hop.server.dtype)
        sent = {
            name: tensor.to(server_dtype) if server_dtype is not None and tensor.is_floating_point() else tensor
            for name, tensor in current.items()
        }
        reply, outputs = connection.request(fields, sent)
        current.update(outputs)
    outputs = {name: current[name].to(caller_dtypes.get(name, current[name].dtype)) for name in outputs}
    return reply, outputs
