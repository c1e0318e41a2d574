"""The server's compute thread, which batches steps of different sessions that wait for it together.

Everything a server computes (loading its blocks, measuring them, every request) runs on one thread, in the
order it was submitted (`ComputeThread.submit`). A session's step that its family can run in a batch
(`ModelFamily.batch_key`) is submitted with that key (`submit_batchable`). When the thread reaches such a
step, it takes every queued step with the same key, one per session and up to `max_rows` rows (batch x new
tokens) in all, and runs them together. Before that it waits, up to `batch_wait` seconds, for the sessions
expected within that time, among those that stepped with that key within the last `ACTIVE` seconds: the ones
that ran in the same batch as the step's session last time (their clients, or the previous server of their
route, send their next steps together), and any other whose client came back last time soon enough after its
step ended to come within the wait again; not those overdue by more than `batch_wait`. A client alone never waits, and with `batch_wait` 0 every step runs
alone, in order, as before.

This is continuous batching (vLLM's, llama.cpp server's slots): sessions join and leave the batch at every
step, each with its own cache, length and mask.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

ACTIVE = 1.0  # seconds after its last step during which a session is worth waiting for

# run_together(items) -> one outcome per item: its result, or the exception it raised alone
RunTogether = Callable[[list[Any]], list[Any]]


@dataclass
class _Task:
    run: Callable[[], Any]  # the task alone
    future: Future = field(default_factory=Future)
    key: Hashable | None = None  # tasks with one key (not None) may run together, through `run_together`
    member: Hashable | None = None  # the session: at most one of its tasks per batch
    rows: int = 0
    item: Any = None  # what `run_together` gets for this task
    run_together: RunTogether | None = None
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Stepper:
    """What the compute thread knows of a session that steps with one batch key."""

    ended: float  # when its last step ended
    turnaround: float  # seconds from the end of one step to the arrival of its next one, last time
    batch: int  # the number of the batch its last step ran in

    def expected(self) -> float:
        return self.ended + self.turnaround


class ComputeThread:
    """One thread that runs what it is given in order, batching steps (see the module's docstring). Offers what
    the server used of `concurrent.futures.Executor`: `submit` and `shutdown`."""

    def __init__(self, batch_wait: float = 0.0, max_rows: int = 16384, name: str = "swarm-compute"):
        self.batch_wait = batch_wait  # seconds a step may wait for other active sessions' steps; 0: no batching
        self.max_rows = max_rows  # rows (batch x new tokens) of one batch
        self.batches = 0  # forwards that ran several sessions' steps
        self.batched_steps = 0  # steps that ran in them
        self.busy_seconds = 0.0  # time spent running tasks (not waiting for them, nor for a batch to fill)
        self._tasks: deque[_Task] = deque()
        self._changed = threading.Condition()
        self._steppers: dict[Hashable, dict[Hashable, _Stepper]] = {}  # key -> session -> its last step
        self._runs = 0  # batches and steps run alone, numbered
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable, *args) -> Future:
        """Runs `function(*args)` alone, after what was submitted before."""
        return self._put(_Task(lambda: function(*args)))

    def submit_batchable(
        self, key: Hashable, member: Hashable, rows: int, item: Any, run_alone: Callable[[], Any], run_together: RunTogether
    ) -> Future:
        """A step of session `member` that may run with others of the same `key` (`run_together([item, ...])`)
        or alone (`run_alone()`)."""
        return self._put(_Task(run_alone, key=key, member=member, rows=rows, item=item, run_together=run_together))

    def shutdown(self, wait: bool = True, cancel_futures: bool = False):
        with self._changed:
            self._stopped = True
            if cancel_futures:
                for task in self._tasks:
                    task.future.cancel()
                self._tasks.clear()
            self._changed.notify_all()
        if wait:
            self._thread.join()

    def _put(self, task: _Task) -> Future:
        with self._changed:
            if self._stopped:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._tasks.append(task)
            self._changed.notify_all()
        return task.future

    def _serve(self):
        while True:
            with self._changed:
                while not self._tasks and not self._stopped:
                    self._changed.wait()
                if not self._tasks:
                    return
                first = self._tasks.popleft()
                batch = self._gather(first) if first.key is not None and self.batch_wait > 0 else [first]
            batch = [task for task in batch if task.future.set_running_or_notify_cancel()]
            started = time.perf_counter()
            if len(batch) == 1:
                _settle(batch[0].future, batch[0].run)
            elif batch:
                self._run_together(batch)
            self.busy_seconds += time.perf_counter() - started
            self._remember(batch)

    def _gather(self, first: _Task) -> list[_Task]:
        """`first` and the queued steps that can join it, after waiting for the active sessions' steps (called
        holding the lock, which waiting releases)."""
        started = time.monotonic()
        batch, rows, deadline = [first], first.rows, started + self.batch_wait
        while True:
            members = {task.member for task in batch}
            for task in list(self._tasks):
                if task.key == first.key and task.member not in members and rows + task.rows <= self.max_rows:
                    self._tasks.remove(task)
                    batch.append(task)
                    members.add(task.member)
                    rows += task.rows
            now = time.monotonic()
            steppers = self._steppers.get(first.key, {})
            cohort = steppers[first.member].batch if first.member in steppers else None
            awaited = {member for member, stepper in steppers.items()
                       if member not in members and stepper.expected() >= started - self.batch_wait  # not long overdue
                       and (stepper.batch == cohort or stepper.expected() <= deadline)}  # fmt: skip
            if not awaited or rows >= self.max_rows or now >= deadline or self._stopped:
                return batch
            self._changed.wait(deadline - now)

    def _run_together(self, batch: list[_Task]):
        try:
            outcomes = batch[0].run_together([task.item for task in batch])
        except BaseException as error:  # a bug in batching: every step of the batch hears of it
            outcomes = [error] * len(batch)
        for task, outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                task.future.set_exception(outcome)
            else:
                task.future.set_result(outcome)
        self.batches += 1
        self.batched_steps += len(batch)

    def _remember(self, batch: list[_Task]):
        """Notes when each session's step ended and how long its client took to send it, and forgets sessions
        inactive for longer than `ACTIVE`."""
        now = time.monotonic()
        with self._changed:
            self._runs += 1
            for task in batch:
                if task.key is not None:
                    steppers = self._steppers.setdefault(task.key, {})
                    last = steppers.get(task.member)
                    turnaround = max(task.arrived - last.ended, 0.0) if last is not None else 0.0
                    steppers[task.member] = _Stepper(ended=now, turnaround=turnaround, batch=self._runs)
            for key, steppers in list(self._steppers.items()):
                for member in [member for member, stepper in steppers.items() if now - stepper.ended >= ACTIVE]:
                    del steppers[member]
                if not steppers:
                    del self._steppers[key]


def _settle(future: Future, run: Callable[[], Any]):
    try:
        future.set_result(run())
    except BaseException as error:
        future.set_exception(error)
