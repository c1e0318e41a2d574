"""The server's RPCs: thin handlers that unpack a request, hand it to the family's math, pack the reply.

Requests are `{"method": ..., ...fields}` plus named tensors (see `swarm.wire`). Floating-point tensors may come
in float32, bfloat16 or float16 (all in one): the server computes in its own dtype and answers, and pushes on, in
the one they came in.

    info                                    -> model, span, dtype, version, open sessions, limits, push and batch
                                               counts, seconds of compute
    forward  start, end         + tensors   -> tensors        (no cache)
    open     start, end, max_length         -> session_id
    step     session_id [phases] + tensors  -> tensors, length  (phases: for a round-trip model, the ones
                                                                  to run, each fed what the previous returned)
    step     session_id position [push_to] [await_push]         -> the same, pushing on (see `swarm.server.push`);
                                                                  position: the session's length, or for a
                                                                  round-trip model the steps it has run
    step     ... crop                                           -> the same, the session first cut to `crop` positions
    push     session_id position + tensors  -> accepted         (from the previous server of a route)
    close    session_id                     -> closed
    echo                        + tensors   -> the same tensors (measures the transport alone)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from swarm.errors import BadRequestError, RemoteError, ServerBusyError, ServerUnavailableError
from swarm.models.base import LoadedSpan, ModelFamily, Tensors
from swarm.models.checks import require
from swarm.quantization import rows_independent
from swarm.server.batching import ComputeThread
from swarm.server.push import MAX_AWAIT_TIMEOUT, PushLinks, PushTarget
from swarm.server.sessions import Session, SessionManager
from swarm.spans import BlockSpan
from swarm.transport import Connection, ConnectionContext, Message
from swarm.wire import DTYPES, FLOAT_DTYPES, dtype_name, is_int

logger = logging.getLogger(__name__)

AWAIT_POLL = 0.05  # seconds between looks, while a step awaits its push, at whether the client sent another request


@dataclass(frozen=True)
class RequestLimits:
    """What one request and all sessions together may ask of the server (see `ServerConfig`)."""

    max_session_length: int  # positions one session may hold
    max_request_tokens: int = 16384  # rows of hidden states (batch x positions) in one request
    max_batch_size: int = 64  # sequences in one request
    max_sessions: int = 256  # sessions open at once
    cache_memory: int = 1 << 30  # bytes all sessions' state may hold
    busy_wait: float = 5.0  # seconds a step waits for cache memory before it is answered "busy"


@dataclass(frozen=True)
class StepCall:
    """A session step as its request asked for it, less its tensors (which a push may bring later)."""

    context: ConnectionContext  # the client's connection, which gets the reply
    session: Session
    phases: list[str | None]
    position: int | None  # where the session must stand, or None
    push_to: PushTarget | None  # the next server, to push the outputs on to
    link: tuple[Connection | None, str | None] | None  # the connection to it, or why there is none


class RequestHandler:
    def __init__(
        self,
        family: ModelFamily,
        loaded: LoadedSpan,
        sessions: SessionManager,
        model_name: str,
        version: str,
        limits: RequestLimits,
        compute: ComputeThread,
        push_links: PushLinks | None = None,
    ):
        self.family = family
        self.loaded = loaded
        self.sessions = sessions
        self.model_name = model_name
        self.version = version
        self.limits = limits
        self.compute = compute  # the server's one compute thread (see `Server.compute`)
        self.push_links = push_links or PushLinks(swarm_key=None)
        # steps pushed on, not, run from a push, and pushes dropped
        self.push_counts = {"pushed": 0, "push_failed": 0, "received": 0, "refused": 0}
        self.accepting_sessions = True

    def __call__(self, fields: dict[str, Any], tensors: Tensors, context: ConnectionContext) -> Message:
        method = fields.get("method")
        handler = getattr(self, f"rpc_{method}", None) if isinstance(method, str) else None
        if handler is None:
            raise BadRequestError(f"unknown method {method!r}")
        return handler(fields, tensors, context)

    def rpc_info(self, fields, tensors, context) -> Message:
        span = self.loaded.span
        info = {"model": self.model_name, "start": span.start, "end": span.end, "version": self.version}
        limits = {"max_request_tokens": self.limits.max_request_tokens, "max_batch_size": self.limits.max_batch_size}
        pushes = {f"steps_{name}": count for name, count in self.push_counts.items()}
        batches = {"batches": self.compute.batches, "steps_batched": self.compute.batched_steps,
                   "compute_seconds": self.compute.busy_seconds}  # fmt: skip
        precision = {"dtype": dtype_name(self.loaded.dtype), "quant_type": self.loaded.quant_type}
        return {**info, **precision, "sessions": len(self.sessions), **limits, **pushes, **batches}, {}

    def rpc_echo(self, fields, tensors, context) -> Message:
        return {}, tensors

    def rpc_forward(self, fields, tensors, context) -> None:
        sub_span = self._sub_span(fields)
        self._check_size(tensors)
        inputs, wire = self._in_compute_dtype(tensors, sub_span)
        self.family.check_inputs(self.loaded, inputs, None, None, sub_span, None)
        self._compute_and_reply(context, self._forward, sub_span, inputs, wire)

    def rpc_open(self, fields, tensors, context) -> Message:
        if not self.accepting_sessions:
            raise ServerUnavailableError("this server is leaving the swarm and takes no new sessions")
        sub_span = self._sub_span(fields)
        max_length = fields.get("max_length")
        require(is_int(max_length) and max_length > 0, f"max_length must be a positive int, got {max_length!r}")
        require(
            max_length <= self.limits.max_session_length,
            f"max_length {max_length} exceeds this server's limit of {self.limits.max_session_length} positions",
        )
        if len(self.sessions) >= self.limits.max_sessions:
            raise ServerBusyError(f"this server holds its limit of {self.limits.max_sessions} open sessions")
        state = self.family.new_session_state(self.loaded, sub_span, max_length)
        session = self.sessions.open(sub_span, max_length, state)
        context.on_close.append(lambda: self.sessions.close(session.id))
        return {"session_id": session.id}, {}

    def rpc_step(self, fields, tensors, context) -> Message | None:
        session = self.sessions.get(fields.get("session_id"))
        phases = self._phases(fields)
        position = fields.get("position")
        require(position is None or (is_int(position) and position >= 0), f"position must be a non-negative int, got {position!r}")
        crop = fields.get("crop")
        require(crop is None or (is_int(crop) and crop >= 0), f"crop must be a non-negative int, got {crop!r}")
        push_to = PushTarget.parse(fields["push_to"]) if "push_to" in fields else None
        if crop is not None:
            require(phases == [None] and hasattr(session.state, "crop"), "crop is for sessions of models that make one pass per step")
            with session.lock:
                session.state.crop(crop)
                session.counted()
        awaits = fields.get("await_push") is not None
        if awaits:
            require(fields["await_push"] is True and position is not None and not tensors,
                    "await_push is true, with a position and no tensors")  # fmt: skip
            timeout = fields.get("await_timeout", 60.0)
            require(isinstance(timeout, (int, float)) and 0 < timeout <= MAX_AWAIT_TIMEOUT,
                    f"await_timeout must be in (0, {MAX_AWAIT_TIMEOUT:g}] seconds, got {timeout!r}")  # fmt: skip
        self._wait_for_cache_memory()
        link = self.push_links.link(push_to) if push_to is not None else None  # connects now, if need be
        call = StepCall(context, session, phases, position, push_to, link)
        if awaits:
            return self._await_push(call, timeout)
        return self._submit_step(call, tensors).result()

    def _submit_step(self, call: StepCall, tensors: Tensors) -> Future:
        """Hands a step to the compute thread: in a batch with other sessions' steps if its family can batch it."""
        run_alone = functools.partial(self._run_step, call, tensors)
        batchable = call.phases == [None] and rows_independent(self.loaded.quant_type)
        try:
            key = self.family.batch_key(self.loaded, call.session.span, tensors, call.session.state, None) if batchable else None
        except Exception:  # inputs that are not what the family takes: the step runs alone, which says what is wrong
            key = None
        if key is None:
            return self.compute.submit(run_alone)
        rows = max((tensor.shape[0] * tensor.shape[1] for tensor in tensors.values() if tensor.ndim > 1), default=0)
        return self.compute.submit_batchable(key, call.session.id, rows, (call, tensors), run_alone, self._run_steps_together)

    def _run_step(self, call: StepCall, tensors: Tensors):
        """On the compute thread: runs a step (and pushes it on) and sends its reply from there, one thread switch
        sooner than the connection's thread could. A step whose `position` is not where the session stands is
        answered `stale`; an error reaches the connection's thread unsent, for the transport to answer with."""
        inputs, wire = self._in_compute_dtype(tensors, call.session.span)
        with contextlib.ExitStack() as locks, torch.inference_mode():
            if self._ready_to_run(call, inputs, locks, check=False):
                self._finish_step(call, tensors, self._step(call.session, call.phases, inputs, wire))

    def _run_steps_together(self, steps: list[tuple[StepCall, Tensors]]) -> list[Any]:
        """On the compute thread: runs steps of different sessions (with one batch key) as one forward, then pushes
        each on and replies to each. A step that cannot run (bad inputs, stale, its client gone) is answered or
        dropped alone; if the forward fails, each step runs alone, so that only a faulty one fails."""
        outcomes: list[Any] = [None] * len(steps)
        ready = []  # (index, inputs in the server's dtype, the dtype to answer in)
        with contextlib.ExitStack() as locks, torch.inference_mode():
            for index, (call, tensors) in enumerate(steps):
                try:
                    inputs, wire = self._in_compute_dtype(tensors, call.session.span)
                    if self._ready_to_run(call, inputs, locks, check=True):
                        ready.append((index, inputs, wire))
                except Exception as error:
                    outcomes[index] = error
            replies = None
            if len(ready) > 1:
                sessions = [steps[index][0].session for index, _, _ in ready]
                try:
                    pairs = [(inputs, session.state) for (_, inputs, _), session in zip(ready, sessions)]
                    outputs = self.family.forward_batch(self.loaded, sessions[0].span, pairs)
                    replies = [self._stepped(session, _in_dtype(step_outputs, wire))
                               for session, step_outputs, (_, _, wire) in zip(sessions, outputs, ready)]  # fmt: skip
                except Exception:
                    logger.warning(f"A batch of {len(ready)} steps failed; running them one by one", exc_info=True)
            for order, (index, inputs, wire) in enumerate(ready):
                call, tensors = steps[index]
                try:
                    reply = replies[order] if replies is not None else self._step(call.session, call.phases, inputs, wire)
                    self._finish_step(call, tensors, reply)
                except Exception as error:
                    outcomes[index] = error
        return outcomes

    def _ready_to_run(self, call: StepCall, tensors: Tensors, locks: contextlib.ExitStack, check: bool) -> bool:
        """Whether a step runs: its client is still there and its session stands at its position (else it is
        dropped, or answered `stale`). Takes the session's lock into `locks`; with `check`, checks the inputs."""
        if call.context.peer_is_gone():
            logger.info(f"Dropped a request from {call.context.peer}: its client has gone")
            return False
        self._check_size(tensors)
        session = call.session
        locks.enter_context(session.lock)
        if call.position is not None and self._position(session) != call.position:
            call.context.reply({"stale": True, "length": session.state.length}, {})
            return False
        if check:
            self.family.check_inputs(self.loaded, tensors, session.state, session.max_length, session.span, None)
        return True

    def _finish_step(self, call: StepCall, tensors: Tensors, reply: Message):
        """Pushes a step's outputs on, if it is to be, and replies."""
        if call.push_to is not None:
            reply = self._push_on(call, tensors, reply)
        call.context.reply(*reply)

    def _position(self, session: Session) -> int:
        """Where a session stands, as steps' `position` names it: its length, or for a round-trip model (whose state
        holds no positions) the requests it has run."""
        return session.requests if self.family.phases(self.loaded.config) else session.state.length

    def _push_on(self, call: StepCall, tensors: Tensors, reply: Message) -> Message:
        """Pushes on (from the compute thread, one thread switch sooner than the connection's thread could) what
        the client would have sent the next request after a step: its inputs and outputs joined, or on the way
        back of a round trip its outputs alone. The reply says how the push went."""
        fields, outputs = reply
        declared = self.family.phases(self.loaded.config)
        pushed = outputs if declared and declared[-1] in call.phases else {**tensors, **outputs}
        link, link_problem = call.link
        problem = link_problem or self.push_links.send(call.push_to, link, pushed)
        self.push_counts["push_failed" if problem else "pushed"] += 1
        if problem:
            return {**fields, "pushed": False, "push_error": problem}, outputs
        return {**fields, "pushed": True, "push_round_trip": self.push_links.round_trip(call.push_to)}, outputs

    def rpc_push(self, fields, tensors, context) -> None:
        """Leaves a pushed step's inputs for the step that awaits them; a push has no reply (see `swarm.server.push`),
        so one that cannot be taken is dropped, and logged, and the awaiting step's client finds out."""
        try:
            session = self.sessions.get(fields.get("session_id"))
            position = fields.get("position")
            require(is_int(position) and position >= 0, f"position must be a non-negative int, got {position!r}")
            require(bool(tensors), "a push carries the step's tensors")
            self._check_size(tensors)
            session.mailbox.put(position, tensors)  # the step that takes it checks its position (after any crop)
        except RemoteError as error:
            self.push_counts["refused"] += 1
            logger.info(f"Dropped a push from {context.peer}: {error}")

    def _await_push(self, call: StepCall, timeout: float) -> Message | None:
        """Runs a step on the compute thread with the inputs the previous server pushes for it (at its `position`):
        the push's own thread hands them over, without waking this one. Answers `push_missing` if none came within
        `timeout` or the client sent something else meanwhile (a step of its own, which replaces the push)."""
        session, position, context = call.session, call.position, call.context
        arrived, started = threading.Event(), []

        def on_push(tensors: Tensors):
            try:
                started.append(self._submit_step(call, tensors))
            finally:
                arrived.set()  # even if the compute thread is gone (the server is stopping)

        tensors = session.mailbox.expect(position, on_push)
        if tensors is not None:
            on_push(tensors)
        deadline = time.monotonic() + timeout
        while not arrived.wait(min(AWAIT_POLL, max(deadline - time.monotonic(), 0.0))):
            if context.has_input() or time.monotonic() >= deadline:
                if session.mailbox.cancel(position):
                    return {"push_missing": True}, {}
                arrived.wait()  # the push came meanwhile, and is handing its inputs over
        if not started:
            raise ServerUnavailableError("the server is stopping")
        self.push_counts["received"] += 1
        return started[0].result()

    def rpc_close(self, fields, tensors, context) -> Message:
        session_id = fields.get("session_id")
        require(isinstance(session_id, str), f"session_id must be a string, got {session_id!r}")
        return {"closed": self.sessions.close(session_id)}, {}

    def _check_size(self, tensors: Tensors):
        """A request's rows and positions within the limits (its shapes are the family's to check)."""
        limits = self.limits
        for name, tensor in tensors.items():
            require(
                tensor.ndim == 0 or tensor.shape[0] <= limits.max_batch_size,
                f"{name} holds {tensor.shape[0] if tensor.ndim else 0} sequences; this server takes at most "
                f"{limits.max_batch_size} in one request (max_batch_size)",
            )
            require(
                tensor.ndim != 3 or tensor.shape[0] * tensor.shape[1] <= limits.max_request_tokens,
                f"{name} holds {tensor.shape[0]} x {tensor.shape[1] if tensor.ndim > 1 else 0} positions; this server "
                f"takes at most {limits.max_request_tokens} in one request (max_request_tokens)",
            )

    def _wait_for_cache_memory(self):
        """Returns once the sessions' state fits the cache memory budget, or raises `ServerBusyError` after
        `busy_wait` seconds of waiting for sessions to end."""
        deadline = time.monotonic() + self.limits.busy_wait
        while (held := self.sessions.nbytes()) >= self.limits.cache_memory:
            if time.monotonic() >= deadline:
                raise ServerBusyError(
                    f"this server's sessions hold {held / 2**20:.1f} MiB, its cache memory limit of "
                    f"{self.limits.cache_memory / 2**20:.1f} MiB (cache_memory)"
                )
            time.sleep(0.05)

    def _in_compute_dtype(self, tensors: Tensors, sub_span: BlockSpan) -> tuple[Tensors, torch.dtype]:
        """A request's tensors for `sub_span`, with the floating-point ones in the server's dtype (the hidden states
        in the one the span takes: `ModelFamily.input_dtype`), and the dtype they came in."""
        dtypes = {tensor.dtype for tensor in tensors.values() if tensor.is_floating_point()}
        require(
            len(dtypes) <= 1 and dtypes <= {DTYPES[name] for name in FLOAT_DTYPES},
            f"floating-point tensors must all be in one of {', '.join(FLOAT_DTYPES)}, got {sorted(map(str, dtypes))}",
        )
        inputs = _in_dtype(tensors, self.loaded.dtype)
        if self.loaded.residual_dtype is not None and "hidden_states" in tensors and tensors["hidden_states"].is_floating_point():
            inputs["hidden_states"] = tensors["hidden_states"].to(self.family.input_dtype(self.loaded, sub_span))
        return inputs, next(iter(dtypes), self.loaded.dtype)

    def _forward(self, sub_span: BlockSpan, tensors: Tensors, wire: torch.dtype) -> Message:
        return {}, _in_dtype(self.family.forward(self.loaded, sub_span, tensors, None, None), wire)

    def _step(self, session, phases: list[str | None], tensors: Tensors, wire: torch.dtype) -> Message:
        """Runs a step's phases on `tensors` (in the server's dtype); its reply, in the dtype `wire`."""
        for phase in phases:
            self.family.check_inputs(self.loaded, tensors, session.state, session.max_length, session.span, phase)
            tensors = self.family.forward(self.loaded, session.span, tensors, session.state, phase)
        return self._stepped(session, _in_dtype(tensors, wire))

    def _stepped(self, session: Session, outputs: Tensors) -> Message:
        """Counts a step the session ran, and the bytes its state holds now; its reply."""
        session.requests += 1
        session.counted()
        return {"length": session.state.length}, outputs

    def _compute_and_reply(self, context: ConnectionContext, compute, *args):
        """Runs `compute(*args)` on the compute thread, in inference mode, and sends the reply it makes from
        there, one thread switch sooner than this connection's thread could; returns once it is sent. An
        error reaches the caller unsent, for the transport to answer with."""
        self.compute.submit(_compute_and_reply, context, compute, *args).result()

    def _phases(self, fields: dict[str, Any]) -> list[str | None]:
        """The phases a step runs, in order: [None] for a model that makes one pass per step."""
        declared, phases = list(self.family.phases(self.loaded.config)), fields.get("phases")
        if not declared:
            require(phases is None, "this model makes one pass per step; a step takes no 'phases'")
            return [None]
        runs = [declared[start:end] for start in range(len(declared)) for end in range(start + 1, len(declared) + 1)]
        require(phases in runs, f"phases must be one or more of {declared}, in that order; got {phases!r}")
        return phases

    def _sub_span(self, fields: dict[str, Any]) -> BlockSpan:
        start, end = fields.get("start"), fields.get("end")
        hosted = self.loaded.span
        require(
            is_int(start) and is_int(end) and hosted.start <= start < end <= hosted.end,
            f"blocks [{start}, {end}) are not within this server's span [{hosted.start}, {hosted.end})",
        )
        sub_span = BlockSpan(start, end)
        stages = self.family.stages(self.loaded.config)
        require(
            any(stage.contains_span(sub_span) for stage in stages),
            f"blocks {sub_span} cross a stage boundary; stages are {', '.join(map(str, stages))}",
        )
        return sub_span


def _in_dtype(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    """`tensors` with the floating-point ones in `dtype`."""
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}


def _compute_and_reply(context: ConnectionContext, compute, *args):
    if context.peer_is_gone():
        logger.info(f"Dropped a request from {context.peer}: its client has gone")
        return
    with torch.inference_mode():
        reply = compute(*args)
    context.reply(*reply)
