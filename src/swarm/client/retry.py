"""The one retry policy of the client: bounded attempts, exponential backoff with jitter, a bound on time.

Only peer and transport failures (`PeerError`) and a server's own failures (`RemoteError` other than
`BadRequestError`) are retried, on other servers. A bad request or a local exception is a bug: it is
raised at once. A server's internal error is tried on one other server only (see `RemoteBlocks.recover`), so
that a request that fails everywhere does not get every healthy server banned in turn.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from swarm.errors import AccessDeniedError, BadRequestError, PeerError, RemoteError


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6  # tries of one operation, the first included
    base_delay: float = 0.1  # seconds before the first retry; doubles after each failure
    max_delay: float = 5.0  # cap on a single delay
    jitter: float = 0.5  # each delay is multiplied by a random factor in [1 - jitter, 1 + jitter]
    total_timeout: float = 60.0  # seconds after the first failure when retrying stops

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the `failures`-th consecutive failure (1-based)."""
        delay = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        return delay * (1 + self.jitter * (2 * (rng or random).random() - 1))

    def start(self) -> "RetryBudget":
        return RetryBudget(self)


class RetryBudget:
    """Tracks one operation's failures against its policy."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self.failures = 0
        self.first_failure: float | None = None
        self.internal_error: Exception | None = None  # the first server's internal error, if one failed so

    def next_delay(self) -> float | None:
        """Records a failure; returns how long to wait before the next try, or None when the budget is spent."""
        now = time.monotonic()
        self.failures += 1
        self.first_failure = self.first_failure if self.first_failure is not None else now
        if self.failures >= self.policy.max_attempts:
            return None
        delay = self.policy.delay(self.failures)
        if now + delay - self.first_failure > self.policy.total_timeout:
            return None
        return delay


def is_retriable(error: BaseException) -> bool:
    """Peer and transport failures, and servers' own errors, are worth trying elsewhere; bugs (and a key the
    client lacks) are not."""
    return isinstance(error, PeerError) or (
        isinstance(error, RemoteError) and not isinstance(error, (BadRequestError, AccessDeniedError))
    )
