"""Spot checks of servers' outputs: a second server recomputes a hop and a third decides when they disagree.

With `ClientConfig(verify=VerifyConfig(...))`, a random `fraction` of forward passes and session steps (and every
one of a session's `first_steps`) is checked hop by hop: another server that hosts the hop's blocks runs the same
request, and the two outputs must agree within `tolerance`. A session's blocks keep state, so the checking server
runs a session of its own, a shadow, which is sent what the hop was sent since the last check before the request
checked (a check costs the compute of the steps since the previous one, on that server).

When two outputs disagree, a third server (a fresh one, replaying the whole history) decides: the server whose
output differs from the third's is left out (`WrongOutputError` for the checked hop, which fails over and replays
like any faulty server; the checker is simply dropped). With no third server to ask, the client cannot tell who
lies and raises `VerificationError`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from swarm.client.routing import Hop
from swarm.errors import VerificationError, WrongOutputError
from swarm.records import ServerRecord, ServerState
from swarm.spans import BlockSpan

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class VerifyConfig:
    fraction: float = 0.05  # share of forward passes and session steps checked by a second server
    first_steps: int = 0  # steps of each session checked whatever the fraction
    tolerance: float = 1e-3  # outputs agree when within this, absolute and relative (float32 on both sides)
    seed: int | None = None  # of the random choice of what is checked (None: unpredictable to servers)


def agree(first: Tensors, second: Tensors, tolerance: float) -> bool:
    """Whether two replies hold the same tensors, equal within `tolerance`."""
    if first.keys() != second.keys():
        return False
    for name, tensor in first.items():
        other = second[name]
        if tensor.shape != other.shape:
            return False
        if tensor.is_floating_point():
            if not torch.allclose(tensor.float(), other.float(), atol=tolerance, rtol=tolerance, equal_nan=False):
                return False
        elif not torch.equal(tensor, other):
            return False
    return True


class Verifier:
    """Decides what is checked and finds the servers that check it."""

    def __init__(self, config: VerifyConfig):
        self.config = config
        self.random = random.Random(config.seed)

    def should_check(self, step: int | None = None) -> bool:
        """Whether to check this forward pass (`step` None) or this step of a session."""
        if step is not None and step < self.config.first_steps:
            return True
        return self.random.random() < self.config.fraction

    def checkers(self, records_by_block: list[list[ServerRecord]], span: BlockSpan, excluded: set[str]) -> list[ServerRecord]:
        """Online servers other than `excluded` whose span holds all of `span`, in random order."""
        found = {
            record.peer_id: record
            for record in records_by_block[span.start]
            if record.state == ServerState.ONLINE and record.peer_id not in excluded and record.span.contains_span(span)
        }
        servers = list(found.values())
        self.random.shuffle(servers)
        return servers

    def judge(self, hop: Hop, checker: ServerRecord, opinions: list[tuple[ServerRecord, Tensors]], expected: Tensors,
              observed: Tensors, remote) -> None:  # fmt: skip
        """After `hop`'s output `observed` and `checker`'s `expected` disagreed: a third opinion among `opinions`
        (server, its output) decides. Raises `WrongOutputError` if the hop is wrong; bans the checker if it is."""
        tolerance = self.config.tolerance
        for third, output in opinions:
            if agree(output, observed, tolerance) and not agree(output, expected, tolerance):
                remote.ban(checker, f"its output disagreed with {hop.server.address}'s and {third.address}'s")
                return
            if agree(output, expected, tolerance):
                raise WrongOutputError(
                    f"{hop.server.address} computed blocks {hop.span} differently from {checker.address} and "
                    f"{third.address}"
                )
        if not opinions:
            raise VerificationError(
                f"{hop.server.address} and {checker.address} disagree on blocks {hop.span}, and no third server "
                "hosts them to tell which is right"
            )
        raise VerificationError(f"three servers disagree on blocks {hop.span}: {hop.server.address}, {checker.address}, ...")
