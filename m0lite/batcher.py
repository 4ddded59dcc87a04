"""Dynamic batching: concurrent requests scored together by one model thread.

torch must not be called from many threads at once, and a reranker scores a
batch of pairs far faster than the same pairs one by one. So every request puts
its (query, document) pairs on one bounded queue and awaits a future; a single
worker thread takes whatever is queued (up to `max_batch_pairs` pairs, waiting
at most `batch_wait_s` for more), scores it in chunks of `max_batch_pairs`, and
hands each request its own slice of the scores. This is sound because a pair's
score does not depend on the other pairs in its batch.

Overload and deadlines never hang a request:
- a full queue refuses at once (`Overloaded`, with a Retry-After estimate);
- a request whose deadline passes gets `DeadlineExceeded`; if it was still
  queued, or between chunks, its pairs are not scored at all.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

log = logging.getLogger("m0lite.batcher")

ScoreFn = Callable[[list], tuple[Sequence[float], Sequence[int]]]


class Overloaded(Exception):
    """The queue is full (or the server is stopping); retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """The request's deadline passed before its scores were ready."""


@dataclass(eq=False)
class _Job:
    pairs: list
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    scores: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    failed: bool = False


class Batcher:
    """Queue + one worker thread around `score_fn(pairs) -> (scores, token_counts)`."""

    def __init__(self, score_fn: ScoreFn, *, max_queue: int = 64, max_batch_pairs: int = 16,
                 batch_wait_s: float = 0.002):
        assert max_queue >= 1 and max_batch_pairs >= 1 and batch_wait_s >= 0
        self.score_fn = score_fn
        self.max_batch_pairs = max_batch_pairs
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._seconds_per_pair = 0.05  # running estimate, for Retry-After
        self.stats = {"batches": 0, "pairs": 0, "expired": 0, "refused": 0}

    # -- request side (event loop) ------------------------------------------------

    async def score(self, pairs: list, deadline: float) -> tuple[list[float], list[int]]:
        """Score `pairs` in some batch; raise Overloaded or DeadlineExceeded instead of hanging."""
        if self._stopping:
            raise Overloaded("server is shutting down", retry_after=5)
        self._ensure_started()
        loop = asyncio.get_running_loop()
        job = _Job(pairs=list(pairs), deadline=deadline, loop=loop, future=loop.create_future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats["refused"] += 1
            raise Overloaded(f"server is busy: {self._queue.maxsize} requests already queued",
                             retry_after=self.retry_after()) from None
        try:
            # On timeout wait_for cancels the future; the worker sees that and skips the job.
            return await asyncio.wait_for(job.future, max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise DeadlineExceeded() from None

    def retry_after(self) -> int:
        """Seconds until the queue has probably drained: queued pairs x seconds per pair."""
        with self._queue.mutex:
            queued = sum(len(j.pairs) for j in self._queue.queue)
        return int(min(max(math.ceil(queued * self._seconds_per_pair), 1), 60))

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()  # not started yet counts as healthy

    # -- lifecycle -----------------------------------------------------------------

    def _ensure_started(self) -> None:
        # Started lazily so that the app works with or without ASGI lifespan events.
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="m0lite-model", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, refuse whatever is still queued, end the worker."""
        self._stopping = True
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            self._fail(job, Overloaded("server is shutting down", retry_after=5))

    # -- worker side (model thread) ------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            jobs, n = [first], len(first.pairs)
            until = time.monotonic() + self.batch_wait_s
            while n < self.max_batch_pairs:
                try:
                    job = self._queue.get(timeout=max(until - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                jobs.append(job)
                n += len(job.pairs)
            try:
                self._score_jobs(jobs)
            except BaseException as e:  # never let the one model thread die
                log.exception("batch failed unexpectedly")
                for job in jobs:
                    self._fail(job, e)

    def _live(self, job: _Job) -> bool:
        """Still worth scoring: not failed, not abandoned by its waiter, not past its deadline."""
        if job.failed or job.future.done():
            return False
        if time.monotonic() > job.deadline:
            self.stats["expired"] += 1
            self._fail(job, DeadlineExceeded())
            return False
        return True

    def _score_jobs(self, jobs: list[_Job]) -> None:
        work = [(job, i) for job in jobs if self._live(job) for i in range(len(job.pairs))]
        for start in range(0, len(work), self.max_batch_pairs):
            chunk = [(job, i) for job, i in work[start:start + self.max_batch_pairs] if self._live(job)]
            if not chunk:
                continue
            t0 = time.perf_counter()
            try:
                results = self._call([job.pairs[i] for job, i in chunk])
            except Exception as e:
                if len({id(job) for job, _ in chunk}) == 1:
                    self._fail(chunk[0][0], e)
                    continue
                # One request's bad pair must not fail the others: score each request's part alone.
                results = self._retry_per_job(chunk)
            for (job, _), (score, tokens) in zip(chunk, results):
                if score is not None:
                    job.scores.append(score)
                    job.tokens.append(tokens)
            seconds = (time.perf_counter() - t0) / len(chunk)
            self._seconds_per_pair = 0.8 * self._seconds_per_pair + 0.2 * seconds
            self.stats["batches"] += 1
            self.stats["pairs"] += len(chunk)
        for job in jobs:
            if not job.failed and len(job.scores) == len(job.pairs):
                self._deliver(job, (job.scores, job.tokens))

    def _call(self, pairs: list) -> list[tuple[float, int]]:
        scores, tokens = self.score_fn(pairs)
        if len(scores) != len(pairs) or len(tokens) != len(pairs):
            raise RuntimeError(f"score_fn returned {len(scores)} scores and {len(tokens)} token counts "
                               f"for {len(pairs)} pairs")
        return [(float(s), int(t)) for s, t in zip(scores, tokens)]

    def _retry_per_job(self, chunk: list[tuple[_Job, int]]) -> list[tuple[Any, Any]]:
        results: list[tuple[Any, Any]] = [(None, None)] * len(chunk)
        for job in dict.fromkeys(job for job, _ in chunk):
            at = [k for k, (j, _) in enumerate(chunk) if j is job]
            try:
                for k, r in zip(at, self._call([job.pairs[chunk[k][1]] for k in at])):
                    results[k] = r
            except Exception as e:
                self._fail(job, e)
        return results

    def _fail(self, job: _Job, error: BaseException) -> None:
        job.failed = True
        self._deliver(job, error)

    @staticmethod
    def _deliver(job: _Job, outcome: Any) -> None:
        def settle() -> None:
            if job.future.done():  # the waiter gave up (deadline, disconnect)
                return
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed: nobody is waiting
            pass
