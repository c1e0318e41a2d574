import random

import pytest

from swarm.client.retry import RetryPolicy, is_retriable
from swarm.errors import BadRequestError, PeerError, PeerTimeoutError, RemoteError, ServerUnavailableError


def test_delays_grow_exponentially_with_bounded_jitter():
    policy = RetryPolicy(base_delay=0.1, max_delay=1.0, jitter=0.5)
    rng = random.Random(0)
    for failures, nominal in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        for _ in range(20):
            assert nominal * 0.5 <= policy.delay(failures, rng) <= nominal * 1.5
    assert RetryPolicy(jitter=0).delay(3) == pytest.approx(0.4)


def test_budget_stops_after_max_attempts():
    budget = RetryPolicy(max_attempts=3, base_delay=0.01, total_timeout=100).start()
    assert budget.next_delay() is not None
    assert budget.next_delay() is not None
    assert budget.next_delay() is None


def test_budget_stops_when_time_is_up():
    budget = RetryPolicy(max_attempts=100, base_delay=1.0, jitter=0, total_timeout=2.5).start()
    assert budget.next_delay() == 1.0
    assert budget.next_delay() == 2.0
    assert budget.next_delay() is None


def test_only_peer_failures_are_retried():
    assert is_retriable(PeerError("gone"))
    assert is_retriable(PeerTimeoutError("hung"))
    assert is_retriable(RemoteError("server exploded", "RuntimeError"))
    assert is_retriable(ServerUnavailableError("leaving"))
    assert not is_retriable(BadRequestError("wrong shape"))
    assert not is_retriable(RuntimeError("a bug of ours"))
    assert not is_retriable(ValueError("shape mismatch"))
