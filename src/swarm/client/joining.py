"""Concurrent calls of a model's head from several threads, run as one call over their rows joined.

The HTTP API's requests share one distributed model, each generating in a thread of its own. Every step of each
request runs the model's head (a linear map to the vocabulary, the largest product the client computes) over a
row or a few. The weights are read once per product, whatever its rows, so one product over the rows of every
waiting call costs about what one call's costs (in bfloat16 on CPUs with AMX, the same).

`join_concurrent_calls(module)` makes the module's forward join them: a call that finds no other running computes
at once, alone (a single client waits for nothing); calls that come while one is computing wait for it, then the
first of them computes every waiting call's rows in one product and hands each its own rows (calls with
gradients, or under autocast, run alone, as they are). Each row is computed as the module computes any row: a
result differs from the call's alone only by the rounding of a product over more rows (within 1e-6 in float32).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Call:
    rows: torch.Tensor
    inference: bool  # whether its thread runs in inference mode: its result is made in the same mode
    output: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass(eq=False)
class JoinedCalls:
    """Stands in for `forward` (a function of a tensor whose last dimension is the features of each row, and
    whose rows are independent): joins the rows of concurrent calls into one call."""

    forward: object
    _waiting: list[_Call] = field(default_factory=list)
    _running: bool = False
    _condition: threading.Condition = field(default_factory=threading.Condition)
    joined: int = 0  # products run over the rows of more than one call

    @property
    def running(self) -> bool:
        """Whether a product runs now."""
        return self._running

    @property
    def queued(self) -> int:
        """Calls waiting for the product running now to end."""
        with self._condition:
            return len(self._waiting)

    def __call__(self, rows: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not isinstance(rows, torch.Tensor) or rows.numel() == 0 or _thread_bound(rows):
            return self.forward(rows, *args, **kwargs)
        call = _Call(rows, torch.is_inference_mode_enabled())
        with self._condition:
            self._waiting.append(call)
            while self._running and not call.done:
                self._condition.wait()
            if call.done:
                return self._result(call)
            self._running = True
            calls, self._waiting = self._waiting, []
        try:
            self._run(calls)
        finally:
            with self._condition:
                for other in calls:
                    if not other.done:  # the leader was interrupted (KeyboardInterrupt, ...)
                        other.error, other.done = RuntimeError("the thread computing this call was interrupted"), True
                self._running = False
                self._condition.notify_all()
        return self._result(call)

    @staticmethod
    def _result(call: _Call) -> torch.Tensor:
        if call.error is not None:
            raise call.error
        return call.output

    def _run(self, calls: list[_Call]):
        """Computes `calls`, those that can be joined in one product each; every call gets its output or error."""
        groups: dict[tuple, list[_Call]] = {}
        for call in calls:
            key = (call.inference, call.rows.dtype, call.rows.device, call.rows.shape[-1])
            groups.setdefault(key, []).append(call)
        for group in groups.values():
            with torch.inference_mode(group[0].inference):
                if len(group) == 1 or not self._run_joined(group):
                    for call in group:
                        self._run_alone(call)
            for call in group:
                call.done = True

    def _run_alone(self, call: _Call):
        try:
            call.output = self.forward(call.rows)
        except Exception as error:
            call.error = error

    def _run_joined(self, group: list[_Call]) -> bool:
        """Runs `group` as one product; False if it failed (then each call runs alone, to fail on its own)."""
        features = group[0].rows.shape[-1]
        try:
            output = self.forward(torch.cat([call.rows.reshape(-1, features) for call in group]))
        except Exception:
            logger.debug("a joined call failed; its calls run alone", exc_info=True)
            return False
        self.joined += 1
        for call, rows in zip(group, output.split([call.rows.numel() // features for call in group])):
            call.output = rows.reshape(*call.rows.shape[:-1], *output.shape[1:])
        return True


def _thread_bound(rows: torch.Tensor) -> bool:
    """Whether a call's result depends on its thread's state beyond the inference mode: gradients recorded for it,
    or autocast (another thread's product would run without either); such a call runs alone."""
    return torch.is_grad_enabled() or torch.is_autocast_enabled(rows.device.type)


def join_concurrent_calls(module: nn.Module) -> JoinedCalls:
    """Makes `module`'s forward (row-wise, such as a linear map) join the rows of concurrent calls; its class,
    parameters and state dict stay as they are."""
    joined = JoinedCalls(module.forward)
    module.forward = joined
    return joined
