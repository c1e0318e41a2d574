"""Inference sessions on a server: each keeps its blocks' state (a KV cache, ...) between steps.

A session is freed when its client closes it, when the connection that opened it closes, or when it
has been idle longer than the server's session timeout.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from swarm.errors import SessionExpiredError
from swarm.server.push import Mailbox
from swarm.spans import BlockSpan

logger = logging.getLogger(__name__)


@dataclass
class Session:
    id: str
    span: BlockSpan  # blocks this session runs, within the server's span
    max_length: int  # positions the session may hold, prefill included
    state: Any  # the family's session state
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one step at a time
    mailbox: Mailbox = field(default_factory=Mailbox)  # inputs the previous server of the route pushed
    requests: int = 0  # steps it has run (a round-trip model's steps name their position so)
    nbytes: int = 0  # bytes its state holds, as of its last step (see `counted`)

    def counted(self):
        """Counts the bytes the session's state holds now (after a step or a crop), for `SessionManager.nbytes`."""
        self.nbytes = self.state.nbytes()


class SessionManager:
    def __init__(self, idle_timeout: float):
        self.idle_timeout = idle_timeout
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, span: BlockSpan, max_length: int, state: Any) -> Session:
        session = Session(id=uuid.uuid4().hex, span=span, max_length=max_length, state=state)
        session.counted()
        with self._lock:
            self._sessions[session.id] = session
        logger.debug(f"Opened session {session.id} on blocks {span}, max_length {max_length}")
        return session

    def get(self, session_id: Any) -> Session:
        with self._lock:
            session = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None:
            raise SessionExpiredError(f"this server holds no session {str(session_id)[:64]!r} (closed, idle too long, or the server restarted or moved)")
        session.last_used = time.monotonic()
        return session

    def close(self, session_id: str) -> bool:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            logger.debug(f"Closed session {session_id}")
        return session is not None

    def close_idle(self) -> int:
        """Closes sessions idle for longer than the timeout; returns how many."""
        deadline = time.monotonic() - self.idle_timeout
        with self._lock:
            idle = [session_id for session_id, session in self._sessions.items() if session.last_used < deadline]
            for session_id in idle:
                del self._sessions[session_id]
        if idle:
            logger.info(f"Closed {len(idle)} session(s) idle for more than {self.idle_timeout:.0f} s")
        return len(idle)

    def nbytes(self) -> int:
        """Bytes held by every session's state, as counted after its last step: a server asks before every step,
        and counting every state's tensors then would cost each step time in proportion to the sessions open."""
        with self._lock:
            return sum(session.nbytes for session in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)
