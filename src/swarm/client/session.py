"""Inference sessions with failover: each hop of the route keeps a session (and a KV cache) on its server.

The client remembers, for every hop, the inputs it sent there. When a server dies, hangs past the step
timeout or answers with an error of its own, the client bans it, routes its blocks to other servers
(one or several, split any way), replays the remembered inputs through them step by step (so their
caches are rebuilt exactly as the lost one was), and carries on. Retries follow `ClientConfig.retry`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from swarm.client.remote import RemoteBlocks, Tensors, run_hop, tokens_of
from swarm.client.retry import RetryBudget, is_retriable
from swarm.client.routing import Hop
from swarm.spans import BlockSpan
from swarm.transport import Connection

logger = logging.getLogger(__name__)


@dataclass
class ServerSession:
    """One hop's session: its connection, the server's session id, and every input it has been sent."""

    hop: Hop
    connection: Connection
    session_id: str
    history: list[Tensors] = field(default_factory=list)  # inputs of each step, as sent, oldest first

    def step(self, remote: RemoteBlocks, tensors: Tensors) -> tuple[dict, Tensors]:
        fields = {"method": "step", "session_id": self.session_id}
        reply = run_hop(self.connection, self.hop, fields, tensors, remote.request_timeout(tokens_of(tensors)))
        self.history.append(tensors)
        return reply

    def close(self):
        try:
            self.connection.request({"method": "close", "session_id": self.session_id}, timeout=5)
        except Exception as error:
            logger.debug(f"Could not close session {self.session_id} on {self.connection.address}: {error}")
        self.connection.close()


class InferenceSession:
    """A stepwise session over a route of servers, which survives the loss of any of them."""

    def __init__(self, remote: RemoteBlocks, max_length: int, span: BlockSpan):
        self.remote = remote
        self.max_length = max_length
        self.span = span  # the blocks this session runs
        self.position = 0  # positions the servers have processed
        self.output_ids: torch.Tensor | None = None  # tokens of the conversation so far (for generate)
        self.output_mask: torch.Tensor | None = None  # their attention mask, None while all ones
        self.skip_tokens = 0  # leading tokens of the next step that the servers have already seen
        self._hypo_ids: torch.Tensor | None = None  # row order for the servers' caches at the next step
        self._server_sessions: list[ServerSession] = []
        self.closed = False

    @property
    def route(self) -> list[Hop]:
        return [server_session.hop for server_session in self._server_sessions]

    def __enter__(self) -> "InferenceSession":
        budget = self.remote.config.retry.start()
        route = self.remote.plan_route(self.span)
        while not self._server_sessions:
            try:
                self._server_sessions = [self._open(hop) for hop in route]
            except Exception as error:
                if not is_retriable(error):
                    raise
                route = self.remote.recover(getattr(error, "hop", route[0]), error, budget, self.span)
        return self

    def _open(self, hop: Hop) -> ServerSession:
        config = self.remote.config
        try:
            connection = Connection(hop.server.address, config.connect_timeout)
            fields = {"method": "open", "start": hop.span.start, "end": hop.span.end, "max_length": self.max_length}
            reply, _ = connection.request(fields, timeout=config.step_timeout)
        except Exception as error:
            error.hop = hop
            raise
        return ServerSession(hop, connection, reply["session_id"])

    def reorder(self, hypo_ids: torch.Tensor):
        """Reorders the rows of every server's cache at the next step (composes with a pending reorder)."""
        hypo_ids = hypo_ids.long().cpu()
        self._hypo_ids = hypo_ids if self._hypo_ids is None else self._hypo_ids[hypo_ids]

    def take_hypo_ids(self) -> torch.Tensor | None:
        hypo_ids, self._hypo_ids = self._hypo_ids, None
        return hypo_ids

    def step(self, tensors: Tensors) -> Tensors:
        """Sends new positions through every hop. A hop's reply tensors replace the inputs of the same name for
        the next hop (hidden states); the others travel unchanged (position ids, masks). Floating-point tensors
        come back in the caller's dtype."""
        current = {name: tensor for name, tensor in tensors.items() if tensor is not None}
        caller_dtypes = {name: tensor.dtype for name, tensor in current.items()}
        budget, index, reply, outputs = self.remote.config.retry.start(), 0, {}, {}
        while index < len(self._server_sessions):
            server_session = self._server_sessions[index]
            try:
                reply, outputs = server_session.step(self.remote, current)
            except Exception as error:
                if not is_retriable(error):
                    raise
                self._replace(index, error, budget)
                continue
            current = {**current, **outputs}
            index += 1
        self.position = reply["length"]
        return {name: current[name].to(caller_dtypes.get(name, current[name].dtype)) for name in outputs}

    def _replace(self, index: int, error: Exception, budget: RetryBudget):
        """Swaps hop `index` for a new route over its blocks and replays its history there."""
        failed = self._server_sessions[index]
        failed.connection.close()
        failed_hop = failed.hop
        while True:
            route = self.remote.recover(failed_hop, error, budget, failed.hop.span)
            logger.warning(
                f"Replacing {failed.hop} with {', '.join(map(str, route))}: replaying {len(failed.history)} step(s)"
            )
            try:
                self._server_sessions[index : index + 1] = self._replay(route, failed.history)
                return
            except Exception as replay_error:
                if not is_retriable(replay_error):
                    raise
                error, failed_hop = replay_error, getattr(replay_error, "hop", failed_hop)

    def _replay(self, route: list[Hop], history: list[Tensors]) -> list[ServerSession]:
        """Opens sessions on `route` and sends them `history`, each hop's outputs feeding the next hop."""
        opened = []
        try:
            for hop in route:
                opened.append(self._open(hop))
            for step_inputs in history:
                current = dict(step_inputs)
                for server_session in opened:
                    try:
                        _, outputs = server_session.step(self.remote, current)
                    except Exception as error:
                        error.hop = server_session.hop
                        raise
                    current = {**current, **outputs}
        except BaseException:
            for server_session in opened:
                server_session.connection.close()
            raise
        return opened

    def close(self):
        if self.closed:
            return
        self.closed = True
        for server_session in self._server_sessions:
            server_session.close()

    def __exit__(self, *exc_info):
        self.close()
