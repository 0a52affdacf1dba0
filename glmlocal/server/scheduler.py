"""One model, `parallel` generations at a time: a bounded FIFO of requests and a pool of job threads.

The event loop never runs model code. A request first `reserve()`s a `Ticket` (synchronously, so a full
queue is answered with 429 before any response starts), then `Ticket.stream(fn)` waits for its turn and runs
`fn(cancel)` - a blocking iterator - on one of `parallel` job threads, handing items back to the loop in
batches. The engine decodes the running jobs' sequences together (glmlocal.engine.batch); each job thread
only blocks on its sequence's tokens. Closing the ticket (client gone, handler cancelled) sets `cancel` so
the engine stops that sequence at its next step. The job thread itself hands its place to the next ticket
when its job has really finished, so the hand-over never depends on a request's event loop still being alive.
`parallel` should equal the engine's (`Engine.parallel`): more would only queue inside the engine, where no
429 can be answered.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from glmlocal.server.errors import QueueFullError


class ClientGone(Exception):
    """The ticket was closed (its client went away) before the request got its turn."""


_WAITING, _GRANTED, _RUNNING, _CLOSED = "waiting", "granted", "running", "closed"


class Scheduler:
    """FIFO admission for a single engine: up to `parallel` requests run, `max_queue` more wait behind them.

    Thread-safe: tickets are granted from whichever thread frees a place (via their loop)."""

    def __init__(self, max_queue: int = 16, parallel: int = 1):
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        self.max_queue, self.parallel = max_queue, parallel
        self._lock = threading.Lock()
        self._queue: deque[Ticket] = deque()
        self._granted = 0  # tickets granted a place (running, or about to start)
        self._running: set[Ticket] = set()
        self._executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="glmlocal-generate")
        self._avg_seconds = 5.0  # running mean of job durations, for Retry-After
        self.completed = 0

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return self._granted

    @property
    def busy(self) -> bool:
        return self._granted > 0

    def reserve(self) -> Ticket:
        """Take a place in the queue or raise QueueFullError (429 with Retry-After). Call on the event loop."""
        ticket = Ticket(self, asyncio.get_running_loop())
        with self._lock:
            if self._granted >= self.parallel and len(self._queue) >= self.max_queue:
                retry = math.ceil(self._avg_seconds * (len(self._queue) + 1) / self.parallel)
                raise QueueFullError(len(self._queue), max(1, min(retry, 300)))
            self._queue.append(ticket)
            self._dispatch()
        return ticket

    def shutdown(self) -> None:
        """Server stopping: cancel everything queued or running (the worker thread stays usable, because
        an ASGI host may run lifespan shutdown and keep serving, as test clients do)."""
        with self._lock:
            tickets = list(self._queue) + list(self._running)
        for ticket in tickets:
            ticket.close()

    def _dispatch(self) -> None:  # caller holds the lock
        while self._granted < self.parallel and self._queue:
            ticket = self._queue.popleft()
            if ticket.state != _WAITING:
                continue
            try:
                ticket._loop.call_soon_threadsafe(ticket._wake)
            except RuntimeError:  # its event loop is gone: nobody will ever run it
                ticket.state = _CLOSED
                continue
            ticket.state = _GRANTED
            self._granted += 1

    def _release(self, seconds: float | None = None) -> None:
        with self._lock:
            if seconds is not None:
                self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * seconds
                self.completed += 1
            self._granted -= 1
            self._dispatch()


class Ticket:
    """One request's place in the queue; use `stream()` once, and `close()` in a finally."""

    def __init__(self, scheduler: Scheduler, loop: asyncio.AbstractEventLoop):
        self._sched, self._loop = scheduler, loop
        self._turn: asyncio.Future = loop.create_future()
        self.state = _WAITING
        self.cancel = threading.Event()

    def _wake(self) -> None:
        if not self._turn.done():
            self._turn.set_result(None)

    async def stream(self, fn: Callable[[threading.Event], Iterator], *, heartbeat: float | None = None,
                     coalesce: float = 0.0) -> AsyncIterator[list]:
        """Wait for our turn, run `fn(cancel)` on the generation thread; yield its items in batches.

        With `heartbeat`, an empty batch is yielded whenever that many seconds pass with nothing to report
        (queued, or the prompt is being processed), so callers can keep the connection alive. With
        `coalesce`, batches after the first are gathered for that many seconds: fewer, larger writes keep
        the event loop from taking CPU from llama.cpp's threads token by token on small machines.
        """
        while not self._turn.done():
            await asyncio.wait([self._turn], timeout=heartbeat)
            if not self._turn.done():
                yield []
        with self._sched._lock:
            if self.state != _GRANTED:
                raise ClientGone()
            self.state = _RUNNING
        pipe = _Pipe(self._loop)
        try:
            self._sched._executor.submit(self._job, pipe, fn)
        except BaseException:
            self._sched._release()
            raise
        try:
            while True:
                batch, done, error = await pipe.take(heartbeat)
                if batch or not done:
                    yield batch
                if batch and coalesce and not done:
                    await asyncio.sleep(coalesce)
                if error is not None:
                    raise error
                if done:
                    return
        finally:
            self.cancel.set()

    def _job(self, pipe: _Pipe, fn: Callable[[threading.Event], Iterator]) -> None:
        started = time.monotonic()
        with self._sched._lock:
            self._sched._running.add(self)
        try:
            pipe.pump(fn, self.cancel)
        finally:
            with self._sched._lock:
                self._sched._running.discard(self)
            self._sched._release(time.monotonic() - started)  # before `done` reaches the client
            pipe.close()

    def close(self) -> None:
        """Leave the queue, or cancel our running job. Idempotent."""
        self.cancel.set()
        with self._sched._lock:
            state, self.state = self.state, _CLOSED
            if state == _WAITING:
                try:
                    self._sched._queue.remove(self)
                except ValueError:
                    pass
        if state == _GRANTED:
            self._sched._release()  # turn given but no job started: pass the place on
        if not self._turn.done():
            self._turn.cancel()


class _Pipe:
    """Thread -> event loop hand-off that wakes the loop once per batch, not once per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list = []
        self._done = False
        self._error: BaseException | None = None
        self._wake = asyncio.Event()

    def pump(self, fn: Callable[[threading.Event], Iterator], cancel: threading.Event) -> None:
        try:
            for item in fn(cancel):
                self._put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the request; never kills the worker thread
            with self._lock:
                self._error = exc

    def close(self) -> None:
        with self._lock:
            self._done = True
        self._notify()

    def _put(self, item) -> None:
        with self._lock:
            first = not self._items
            self._items.append(item)
        if first:
            self._notify()

    def _notify(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:
            pass  # the loop is closed (server shutting down); nobody is listening any more

    async def take(self, timeout: float | None = None) -> tuple[list, bool, BaseException | None]:
        """Everything produced so far; ([], False, None) if `timeout` passes with nothing new."""
        while True:
            with self._lock:
                items, self._items = self._items, []
                done, error = self._done, self._error
                if not items and not done:
                    self._wake.clear()
            if items or done:
                return items, done, error
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                return [], False, None
