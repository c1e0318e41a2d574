"""Inference sessions with failover: each hop of the route keeps a session (and a KV cache) on its server.

The client remembers, for every hop, the inputs it sent there. When a server dies, hangs past the step
timeout or answers with an error of its own, the client bans it, routes its blocks to other servers
(one or several, split any way), replays the remembered inputs through them step by step (so their
caches are rebuilt exactly as the lost one was), and carries on. Retries follow `ClientConfig.retry`.

A step makes one pass over the route, or, for a model with two phases (a UNet), a round trip:

    hop 0 (out) -> hop 1 (out) -> ... -> last hop (out and back, one request) -> ... -> hop 1 (back) -> hop 0 (back)

By default servers pass each step on to the next (`swarm.server.push`), down the route and for a round trip back
up; the client reads every hop's reply. Hops remember both kinds of request, and a lost hop's replacement replays
them the same way. A caller may say that a step leaves nothing the next steps need (`keeps_state=False`: a
denoising step, whose skip tensors live only until its way back), or that it replaces everything before it
(`resets_state=True`: new conditioning); failover then replays only what the servers' state depends on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from swarm.client.remote import RemoteBlocks, Tensors, check_hop_reply, in_travel_dtype, run_hop, tokens_of
from swarm.client.retry import RetryBudget, is_retriable
from swarm.client.routing import Hop
from swarm.client.verify import agree
from swarm.errors import BadReplyError, PeerError, WrongOutputError
from swarm.spans import BlockSpan
from swarm.transport import Connection

logger = logging.getLogger(__name__)

PER_POSITION = ("hidden_states", "position_ids", "attention_mask")  # what a step holds for each new position
# A link is relayed once its round trip exceeds RELAY_MARGIN times the two servers' round trips from the client, plus
# RELAY_SLACK seconds (so that links about as fast as the client's do not flap between the two)
RELAY_MARGIN, RELAY_SLACK = 1.2, 0.005


Phases = tuple[str, ...] | None  # the phases one request runs; None for a model that makes one pass


@dataclass
class SentRequest:
    """A request a hop's session was sent, as it was sent."""

    step: int  # the session's step it belongs to
    phases: Phases
    tensors: Tensors


@dataclass
class ServerSession:
    """One hop's session: its connection, the server's session id, and every input it has been sent."""

    hop: Hop
    connection: Connection
    session_id: str
    history: list[SentRequest] = field(default_factory=list)  # what the server's state depends on, oldest first
    length: int = 0  # positions the server's session holds, as its last reply said
    shadow: ServerSession | None = None  # a session on another server of the same blocks that checks this one
    last_outputs: Tensors | None = None  # the tensors of its last reply
    shadow_seen: int = 0  # requests of `history` its shadow has been sent
    owed: int = 0  # requests sent with `Connection.send` whose replies are not read yet
    requests: int = 0  # steps the server's session has run (a round-trip model's steps name their position so)
    crop_to: int | None = None  # the length the server's session is cut to with the next step (see `crop`)

    def crop(self, length: int):
        """Forgets the positions from `length` on: the server's session drops them with the next step, and
        failover replays only what is left. A shadow checking this hop starts over."""
        kept, total = [], 0
        for request in self.history:
            positions = request.tensors["hidden_states"].shape[1]
            if total + positions > length:
                if total < length:
                    kept.append(SentRequest(request.step, request.phases, first_positions(request.tensors, positions, length - total)))
                break
            kept.append(request)
            total += positions
        self.history, self.length, self.crop_to = kept, length, length
        if self.shadow is not None:
            self.shadow.close()
            self.shadow, self.shadow_seen = None, 0

    def _with_crop(self, fields: dict) -> dict:
        return fields if self.crop_to is None else {**fields, "crop": self.crop_to}

    def _step_fields(self, push_to: dict | None, phases: Phases, position: int | None) -> dict:
        fields = {"method": "step", "session_id": self.session_id, "position": self.length if position is None else position}
        fields.update({"phases": list(phases)} if phases else {}, **({"push_to": push_to} if push_to else {}))
        return self._with_crop(fields)

    def push_target(self, remote: RemoteBlocks, position: int | None = None) -> dict:
        """Where the previous hop pushes this hop's step at `position` (by default its next one; see
        `swarm.server.push`)."""
        server = self.hop.server
        position = self.length if position is None else position
        return {"address": server.address, "peer_id": server.peer_id, "session_id": self.session_id,
                "position": position, "dtype": self.hop.travel_dtype, "timeout": remote.config.push_timeout}  # fmt: skip

    def send_await(self, push_to: dict | None, timeout: float, phases: Phases = None, position: int | None = None):
        """Asks the server to run the step at `position` (by default its next one) once the previous hop pushes its
        inputs (and push it on)."""
        fields = {**self._step_fields(push_to, phases, position), "await_push": True, "await_timeout": timeout}
        self.connection.send(fields, {})
        self.owed += 1

    def send_step(self, tensors: Tensors, push_to: dict | None, phases: Phases = None, position: int | None = None):
        """Sends the server the step at `position` (by default its next one) itself, which cancels a step awaiting a
        push, to push on if `push_to`."""
        self.connection.send(self._step_fields(push_to, phases, position), in_travel_dtype(self.hop, tensors))
        self.owed += 1

    def receive_step(self, tensors: Tensors, step: int, timeout: float, phases: Phases = None) -> dict | None:
        """Reads every reply the connection owes; returns the fields of the one that ran the step whose inputs are
        `tensors` (recorded as `step` records a step), or None if none did (no push came). A server that ran the
        step twice, or says it ran it without sending its outputs, sent a bad reply."""
        sent, result, stale = in_travel_dtype(self.hop, tensors), None, False
        asked = {"method": "step", **({"phases": list(phases)} if phases else {})}
        while self.owed:
            reply_fields, outputs = self.connection.receive(timeout)
            self.owed -= 1
            if reply_fields.get("push_missing") is True:
                continue
            if reply_fields.get("stale") is True:
                stale = True
                continue
            if result is not None:
                self.connection.close()
                raise BadReplyError(f"{self.hop.server.address} ran one step twice")
            check_hop_reply(self.connection, self.hop, asked, sent, reply_fields, outputs)
            if phases is None:
                self._check_length(reply_fields, tensors)
            self.length, self.last_outputs, self.crop_to = reply_fields["length"], outputs, None
            self.history.append(SentRequest(step, phases, tensors))
            self.requests += 1
            result = reply_fields
        if stale and result is None:
            self.connection.close()
            raise BadReplyError(f"{self.hop.server.address} says its session is past this step, which it never returned")
        return result

    def _check_length(self, reply_fields: dict, tensors: Tensors):
        expected = self.length + tensors["hidden_states"].shape[1]
        if reply_fields["length"] != expected:
            self.connection.close()
            raise BadReplyError(f"{self.hop.server.address} says its session holds {reply_fields['length']} positions, not {expected}")

    def step(self, remote: RemoteBlocks, tensors: Tensors, phases: Phases, step: int) -> tuple[dict, Tensors]:
        if self.owed:  # a step awaiting a push is outstanding: this one cancels it, and its reply comes first
            position = self.length if phases is None else self.requests
            self.send_step(tensors, None, phases, position)
            return self.receive_step(tensors, step, remote.request_timeout(tokens_of(tensors)), phases), self.last_outputs
        fields = self._with_crop({"method": "step", "session_id": self.session_id})
        if phases is not None:
            fields["phases"] = list(phases)
        reply = run_hop(self.connection, self.hop, fields, tensors, remote.request_timeout(tokens_of(tensors)))
        if phases is None and "hidden_states" in tensors:  # a pass of new positions: the session grows by them
            self._check_length(reply[0], tensors)
        self.length, self.last_outputs, self.crop_to = reply[0]["length"], reply[1], None
        self.history.append(SentRequest(step, phases, tensors))
        self.requests += 1
        return reply

    def close(self):
        if self.shadow is not None:
            self.shadow.close()
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
        self.phases = remote.phases  # () for one pass per step, (out, back) for a round trip
        self.steps = 0  # steps completed
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
            connection = self.remote.open_connection(hop.server)
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

    def crop(self, length: int):
        """Drops every position from `length` on, on every hop (with the next step): assisted decoding's draft tokens
        that were not accepted."""
        if not 0 <= length <= self.position:
            raise ValueError(f"cannot crop a session of {self.position} positions to {length}")
        if length < self.position:
            for server_session in self._server_sessions:
                server_session.crop(length)
            self.position = length

    def take_hypo_ids(self) -> torch.Tensor | None:
        hypo_ids, self._hypo_ids = self._hypo_ids, None
        return hypo_ids

    def step(self, tensors: Tensors, keeps_state: bool = True, resets_state: bool = False) -> Tensors:
        """Sends new positions through every hop (and back, for a round trip). On the way out, a hop's reply
        tensors replace the inputs of the same name for the next hop (hidden states); the others travel
        unchanged (position ids, masks). On the way back, each hop receives what the previous one returned.
        Floating-point tensors come back in the caller's dtype. More positions than a server of the route takes
        in one request (its `max_request_tokens`) go as several steps, their outputs joined.

        `keeps_state=False`: the servers' state after this step does not depend on it, so failover does not
        replay it once it has completed. `resets_state=True`: their state after it depends on nothing
        before it, so failover replays nothing older."""
        chunks = self._chunks(tensors)
        if len(chunks) == 1:
            return self._step(tensors, keeps_state, resets_state)
        outputs = [self._step(chunk, keeps_state, resets_state and index == 0) for index, chunk in enumerate(chunks)]
        return {name: torch.cat([output[name] for output in outputs], dim=1) for name in outputs[-1]}

    def _chunks(self, tensors: Tensors) -> list[Tensors]:
        """`tensors` cut along their positions into steps that every server of the route takes; what is not per
        position (an encoder's output, beam reordering) goes with the first."""
        hidden = tensors.get("hidden_states")
        limit = self.remote.max_request_rows()
        if self.phases or hidden is None or hidden.ndim != 3 or limit is None or hidden.shape[0] * hidden.shape[1] <= limit:
            return [tensors]
        positions, per_chunk = hidden.shape[1], max(1, limit // hidden.shape[0])
        chunks = []
        for start in range(0, positions, per_chunk):
            chunk = {}
            for name, tensor in tensors.items():
                if name in PER_POSITION and tensor is not None and tensor.ndim >= 2 and tensor.shape[1] == positions:
                    chunk[name] = tensor[:, start : start + per_chunk]
                elif start == 0:
                    chunk[name] = tensor
            chunks.append(chunk)
        return chunks

    def _step(self, tensors: Tensors, keeps_state: bool, resets_state: bool) -> Tensors:
        current = {name: tensor for name, tensor in tensors.items() if tensor is not None}
        caller_dtypes = {name: tensor.dtype for name, tensor in current.items()}
        if not self._pushes():
            reply, outputs, current = self._relay_step(current)
        elif self.phases:
            reply, outputs, current = self._push_round_trip(current)
        else:
            reply, outputs, current = self._push_step(current)
        self._forget(keeps_state, resets_state)
        self.steps += 1
        self.position = reply["length"]
        return {name: current[name].to(caller_dtypes.get(name, current[name].dtype)) for name in outputs}

    def _pushes(self) -> bool:
        """Whether steps go along the route by server-to-server push: over two hops or more, unless spot checks are
        on (a hop's output is checked before the next hop runs on it)."""
        config = self.remote.config
        return config.push and self.remote.verifier is None and len(self._server_sessions) > 1

    def _push_step(self, current: Tensors) -> tuple[dict, Tensors, Tensors]:
        """One pass down the route, in runs of hops that push to each other (see `swarm.server.push`): the client
        sends the first hop of a run the step, then the others a step that awaits its push (the first hop computes
        meanwhile), then reads every hop's outputs. A hop that could not push to the next, or whose link to it is
        slower than the way through the client (`push_round_trip` against the client's pings), makes the client relay
        between the two from then on; a hop
        that fails is replaced (its history replayed, as in relay) and the run goes on from its replacement, which
        pushes to the hop after it (whose step still awaits). Returns the last reply's fields, the last hop's outputs
        and the tensors as they left it."""
        remote, budget, reply, outputs = self.remote, self.remote.config.retry.start(), {}, {}
        timeout = remote.request_timeout(tokens_of(current)) + remote.config.push_timeout  # a hop pushes, then replies
        index = 0
        while index < len(self._server_sessions):
            sessions, end = self._server_sessions, self._run_end(index)
            at = index
            try:
                sessions[index].send_step(current, sessions[index + 1].push_target(remote) if index < end else None)
                for at in range(index + 1, end + 1):  # a push that comes before its await waits for it on the server
                    if not sessions[at].owed:
                        sessions[at].send_await(sessions[at + 1].push_target(remote) if at < end else None, timeout * (end - index + 1))
                for at in range(index, end + 1):
                    if (fields := sessions[at].receive_step(current, self.steps, timeout * (at - index + 1))) is None:
                        break  # no push came: the client sends this hop the step itself
                    reply, outputs = fields, sessions[at].last_outputs
                    current, index = {**current, **outputs}, at + 1
                    if at < end and not fields.get("pushed"):
                        self._relay_from_now_on(sessions[at], sessions[at + 1], f"it could not push: {fields.get('push_error')}")
                        break
                    if at < end and self._relaying_is_faster(sessions[at], sessions[at + 1], fields.get("push_round_trip")):
                        self._relay_from_now_on(sessions[at], sessions[at + 1], "the way through the client is faster", logging.INFO)
            except Exception as error:
                if not is_retriable(error):
                    raise
                self._replace(at, error, budget)
        return reply, outputs, current

    def _push_round_trip(self, current: Tensors) -> tuple[dict, Tensors, Tensors]:
        """A round trip (a UNet's way down and back up) by push: each request of the trip (`plan_requests`) pushes
        its result to the hop of the next, the last hop turning around in one request, and the client reads every
        reply (each hop's outputs, for failover's replays). A hop awaits one push at a time, so the client asks for
        a hop's way back once it has read its way down. A hop that could not push, or a link the client relays,
        makes the client relay the rest of the trip (a step it sends a hop cancels that hop's wait); a hop that
        fails is replaced as in relay and the whole trip relayed again (a way down that runs again rebuilds what it
        leaves on its server). Returns the last reply's fields, the last hop's outputs and the tensors it returned."""
        remote, sessions, started = self.remote, self._server_sessions, current
        plan = plan_requests(len(sessions), self.phases, self.phases)
        peers = [sessions[index].hop.server.peer_id for index, _ in plan]
        if any(remote.relayed_links.get(link, 0.0) > time.monotonic() for link in zip(peers, peers[1:])):
            return self._relay_step(current)
        positions, counts = [], {}
        for index, _ in plan:
            positions.append(counts.get(index, sessions[index].requests))
            counts[index] = positions[-1] + 1
        targets = [sessions[index].push_target(remote, position) for (index, _), position in zip(plan[1:], positions[1:])]
        targets.append(None)
        timeout = remote.request_timeout(tokens_of(current)) + remote.config.push_timeout  # a hop pushes, then replies
        await_timeout = timeout * len(plan)
        reply, outputs, relay_from, failing = {}, {}, len(plan), plan[0][0]
        try:
            sessions[failing].send_step(current, targets[0], plan[0][1], positions[0])
            for at, (index, phases) in enumerate(plan[1:], 1):
                if plan[at - 1][0] < index:  # the hop's first request of the trip (its way down)
                    failing = index
                    sessions[index].send_await(targets[at], await_timeout, phases, positions[at])
            for at, (index, phases) in enumerate(plan):
                failing = index
                fields = sessions[index].receive_step(current, self.steps, timeout * (at + 1), phases)
                if fields is None:  # its push never came
                    relay_from = at
                    break
                reply, outputs = fields, sessions[index].last_outputs
                current = outputs if self._goes_back(phases) else {**current, **outputs}
                if at + 1 == len(plan):
                    break
                after = sessions[plan[at + 1][0]]
                if not fields.get("pushed"):
                    self._relay_from_now_on(sessions[index], after, f"it could not push: {fields.get('push_error')}")
                    relay_from = at + 1
                    break
                if self._relaying_is_faster(sessions[index], after, fields.get("push_round_trip")):
                    self._relay_from_now_on(sessions[index], after, "the way through the client is faster", logging.INFO)
                way_back = next((later for later in range(at + 1, len(plan)) if plan[later][0] == index), None)
                if way_back is not None:
                    sessions[index].send_await(targets[way_back], await_timeout, plan[way_back][1], positions[way_back])
            for at in range(relay_from, len(plan)):
                index, phases = plan[at]
                failing = index
                sessions[index].send_step(current, None, phases, positions[at])
                reply = sessions[index].receive_step(current, self.steps, timeout, phases)
                outputs = sessions[index].last_outputs
                current = outputs if self._goes_back(phases) else {**current, **outputs}
        except Exception as error:
            if not is_retriable(error):
                raise
            self._replace(failing, error, remote.config.retry.start())
            return self._relay_step(started)
        return reply, outputs, current

    def _run_end(self, index: int) -> int:
        """The last hop that pushes reach from hop `index`: up to the first link the client relays."""
        sessions, now, end = self._server_sessions, time.monotonic(), index
        while end + 1 < len(sessions) and self.remote.relayed_links.get((sessions[end].hop.server.peer_id, sessions[end + 1].hop.server.peer_id), 0.0) <= now:
            end += 1
        return end

    def _relaying_is_faster(self, first: ServerSession, second: ServerSession, push_round_trip) -> bool:
        """Whether the link's one-way delay (half the round trip its server measured) is clearly more than going
        through the client (half of each server's round trip from here)."""
        latencies = self.remote.latencies
        to_first, to_second = latencies.get(first.hop.server.peer_id), latencies.get(second.hop.server.peer_id)
        if not isinstance(push_round_trip, (int, float)) or push_round_trip < 0 or to_first is None or to_second is None:
            return False
        return push_round_trip > RELAY_MARGIN * (to_first + to_second) + RELAY_SLACK

    def _relay_from_now_on(self, first: ServerSession, second: ServerSession, reason: str, level: int = logging.WARNING):
        duration = self.remote.config.relay_duration
        logger.log(level, f"Relaying from {first.hop.server.address} to {second.hop.server.address} for {duration:.0f} s: {reason}")
        self.remote.relayed_links[(first.hop.server.peer_id, second.hop.server.peer_id)] = time.monotonic() + duration

    def _relay_step(self, current: Tensors) -> tuple[dict, Tensors, Tensors]:
        """One pass over the route (or round trip), the client sending every hop its request."""
        budget, reply, outputs = self.remote.config.retry.start(), {}, {}
        full_step = self.phases or None
        plan, position = plan_requests(len(self._server_sessions), full_step, self.phases), 0
        while position < len(plan):
            index, phases = plan[position]
            try:
                reply, outputs = self._server_sessions[index].step(self.remote, current, phases, self.steps)
                verifier = self.remote.verifier
                if verifier is not None and phases is None and verifier.should_check(self.steps):
                    self._check_hop(self._server_sessions[index], outputs)
            except Exception as error:
                if not is_retriable(error):
                    raise
                extra_hops = self._replace(index, error, budget) - 1
                plan = plan_requests(len(self._server_sessions), full_step, self.phases)
                # the way out goes on from the first hop that replaced the lost one, the way back from the last
                returning = phases is not None and phases == self.phases[1:]
                position = plan.index((index + extra_hops, phases)) if returning else index
                continue
            current = {**current, **outputs} if not self._goes_back(phases) else outputs
            position += 1
        return reply, outputs, current

    def _check_hop(self, server_session: ServerSession, observed: Tensors):
        """Checks the output of `server_session`'s last step against its shadow's, and on disagreement against a
        third server's (see `swarm.client.verify`). A wrong hop raises `WrongOutputError` (it is replaced, and the
        step it got wrong is sent to its replacement); a wrong or failing checker is dropped."""
        hop = server_session.hop
        try:
            expected = self._shadow_output(server_session)
        except PeerError as error:
            self.remote.ban(server_session.shadow.hop.server, f"it failed while checking another server: {error}")
            server_session.shadow.close()
            server_session.shadow = None
            return
        if expected is None or agree(expected, observed, self.remote.verifier.config.tolerance):
            return
        checker, opinions = server_session.shadow.hop.server, []
        for third in self.remote.checkers(hop):
            if third.peer_id == checker.peer_id:
                continue
            try:
                judge = self._replay([Hop(third, hop.span, hop.wire_dtype)], server_session.history)[0]
            except PeerError as error:
                self.remote.ban(third, f"it failed while checking another server: {error}")
                continue
            judge.close()
            opinions.append((third, judge.last_outputs))
            break
        try:
            self.remote.verifier.judge(hop, checker, opinions, expected, observed, self.remote)
        except WrongOutputError:
            server_session.history.pop()  # the step it got wrong goes to its replacement
            raise
        server_session.shadow.close()  # the checker was wrong (and is left out)
        server_session.shadow = None

    def _shadow_output(self, server_session: ServerSession) -> Tensors | None:
        """The output of `server_session`'s last step on its shadow (opened on another server of its blocks if it
        has none), after sending it whatever the hop was sent since, as few requests as it can (`catch_up`);
        None if no other server hosts the blocks."""
        if server_session.shadow is None or server_session.shadow_seen > len(server_session.history):
            checkers = self.remote.checkers(server_session.hop)
            if not checkers:
                return None
            if server_session.shadow is not None:
                server_session.shadow.close()
            server_session.shadow = self._open(Hop(checkers[0], server_session.hop.span, server_session.hop.wire_dtype))
            server_session.shadow_seen = 0
        shadow, pending = server_session.shadow, server_session.history[server_session.shadow_seen :]
        for tensors in catch_up([request.tensors for request in pending]):
            _, outputs = shadow.step(self.remote, tensors, None, self.steps)
        server_session.shadow_seen = len(server_session.history)
        last_positions = pending[-1].tensors["hidden_states"].shape[1]
        return {name: tensor[:, -last_positions:] if tensor.ndim == 3 else tensor for name, tensor in outputs.items()}

    def _goes_back(self, phases: Phases) -> bool:
        """Whether a request with `phases` returns what the next request of the way back receives."""
        return phases is not None and self.phases[-1] in phases

    def _forget(self, keeps_state: bool, resets_state: bool):
        """Drops from every hop's history what failover no longer needs to replay after this step."""
        for server_session in self._server_sessions:
            server_session.history = [
                request
                for request in server_session.history
                if (keeps_state or request.step != self.steps) and (not resets_state or request.step >= self.steps)
            ]

    def _replace(self, index: int, error: Exception, budget: RetryBudget) -> int:
        """Swaps hop `index` for a new route over its blocks and replays its history there; returns the
        number of hops that replaced it."""
        failed = self._server_sessions[index]
        failed.connection.close()
        if failed.shadow is not None:
            failed.shadow.close()
        failed_hop = failed.hop
        while True:
            route = self.remote.recover(failed_hop, error, budget, failed.hop.span)
            logger.warning(
                f"Replacing {failed.hop} with {', '.join(map(str, route))}: replaying {len(failed.history)} request(s)"
            )
            try:
                started = time.perf_counter()
                self._server_sessions[index : index + 1] = self._replay(route, failed.history)
                seconds = time.perf_counter() - started
                logger.info(f"Replaced {failed.hop}: replayed {len(failed.history)} request(s) in {seconds:.3f} s")
                return len(route)
            except Exception as replay_error:
                if not is_retriable(replay_error):
                    raise
                error, failed_hop = replay_error, getattr(replay_error, "hop", failed_hop)

    def _replay(self, route: list[Hop], history: list[SentRequest]) -> list[ServerSession]:
        """Opens sessions on `route` and sends them `history`, each request taking the path it took before."""
        opened = []
        try:
            for hop in route:
                opened.append(self._open(hop))
            for request in history:
                current = dict(request.tensors)
                for index, phases in plan_requests(len(opened), request.phases, self.phases):
                    try:
                        _, outputs = opened[index].step(self.remote, current, phases, request.step)
                    except Exception as error:
                        error.hop = opened[index].hop
                        raise
                    current = {**current, **outputs} if not self._goes_back(phases) else outputs
        except BaseException:
            for server_session in opened:
                server_session.connection.close()
            raise
        return opened

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self._server_sessions:
            self.remote.last_route = self.route
        for server_session in self._server_sessions:
            server_session.close()

    def __exit__(self, *exc_info):
        self.close()


def first_positions(tensors: Tensors, positions: int, keep: int) -> Tensors:
    """A step's tensors cut to its first `keep` of `positions` new positions (what is not per position stays)."""
    return {
        name: tensor[:, :keep] if name in PER_POSITION and tensor.ndim >= 2 and tensor.shape[1] == positions else tensor
        for name, tensor in tensors.items()
    }


def catch_up(requests: list[Tensors]) -> list[Tensors]:
    """Consecutive steps of one pass joined into as few requests as give the same state: their new positions one
    after the other (a new run starts at a step that reorders beams, which must come first in its request)."""
    joined: list[list[Tensors]] = []
    for tensors in requests:
        if joined and _joins(joined[-1][0], tensors):
            joined[-1].append(tensors)
        else:
            joined.append([tensors])
    return [_join(run) for run in joined]


def _joins(first: Tensors, tensors: Tensors) -> bool:
    """Whether a step can join a run that `first` starts: it reorders no beams, and carries what `first` carries,
    less what only a first step sends (an encoder's output) or a mask of all ones."""
    names, first_names = set(tensors) - {"hypo_ids"}, set(first)
    may_lack = {"attention_mask"} | (first_names - set(PER_POSITION))
    return tensors.get("hypo_ids") is None and names <= first_names and first_names - names <= may_lack


def _join(run: list[Tensors]) -> Tensors:
    first = run[0]
    joined = {name: tensor for name, tensor in first.items() if name not in PER_POSITION}
    for name in PER_POSITION:
        if name in first:
            parts = [tensors.get(name) for tensors in run]
            shapes = [tensors["hidden_states"].shape[:2] for tensors in run]
            parts = [part if part is not None else torch.ones(shape, dtype=first[name].dtype) for part, shape in zip(parts, shapes)]
            joined[name] = torch.cat(parts, dim=1)
    return joined


def plan_requests(count: int, phases: Phases, model_phases: tuple[str, ...]) -> list[tuple[int, Phases]]:
    """(hop index, phases) of each request that carries `phases` through `count` consecutive hops, in order.

    One pass (`phases` None): every hop in order. A round trip (`phases` == `model_phases` == (out, back)):
    the hops in order with `out`, the last one with both, then the others in reverse order with `back`.
    A lone `out` or `back` (what a hop in the middle of a route was sent): that half of the trip alone.
    """
    if phases is None:
        return [(index, None) for index in range(count)]
    out, back = model_phases
    turns = out in phases and back in phases
    outward = [(index, (out,)) for index in range(count - turns)] if out in phases else []
    turn = [(count - 1, (out, back))] if turns else []
    inward = [(index, (back,)) for index in reversed(range(count - turns))] if back in phases else []
    return outward + turn + inward
