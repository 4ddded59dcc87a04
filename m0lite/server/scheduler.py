"""The model thread: one thread scores the pairs of every request, in bounded passes, fairly.

torch must not be called from many threads at once, and a pass over many pairs
costs about as much as over few (every pass reads all the weights). So every
request hands its (query, document) pairs, each with its cost (prompt tokens,
image patches), to one `Scheduler`, and awaits a future. The model thread
builds each pass under a budget (pairs, tokens, patches) and fills it
shortest-request-first across the requests waiting, after one pair of each
request that the last pass left out, so that nothing starves; a large request
thus runs a few pairs per pass, and a small request arriving meanwhile waits
for at most the pass in hand. This is sound because a pair's score does not depend on the other pairs
in its pass.

A request's explanations (`explain`) take the same road: the pairs to explain are a job of their own
kind, priced and taken into passes like any other, and the model thread hands a pass's explain items
to `explain_fn` as it hands its score items to `score_fn`; so an explanation never races a score for
the model, and a deadline or a disconnect drops the explanations not yet made.

Overload, deadlines and disconnects never hang a request, nor waste the model:
- a full queue refuses at once (`Overloaded`, with a Retry-After estimate);
- a request whose deadline passes gets `DeadlineExceeded`, and one whose waiter
  gave up (the client disconnected) is dropped; either way its pairs not yet
  scored never are.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

log = logging.getLogger("m0lite.scheduler")

ScoreFn = Callable[[list], tuple[Sequence[float], Sequence[int]]]
ExplainFn = Callable[[list], Sequence[Any]]
KINDS = ("score", "explain")


class Overloaded(Exception):
    """The queue is full (or the server is stopping); retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """The request's deadline passed before its scores were ready."""


@dataclass(frozen=True)
class Cost:
    """What one pair costs a pass: prompt tokens and image patches (vision-tower rows)."""

    tokens: int
    patches: int = 0


@dataclass(eq=False)
class _Job:
    kind: str  # one of KINDS: which function runs its pairs
    pairs: list
    costs: list[Cost]
    deadline: float  # time.monotonic()
    arrival: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    results: list = field(init=False)  # per pair: (score, tokens), or its explanation
    next: int = 0  # pairs before it have been taken into a pass
    done: int = 0  # pairs scored
    starved: int = 0  # passes in a row that took none of its pairs
    failed: bool = False

    def __post_init__(self):
        self.results = [None] * len(self.pairs)
        # Cost of the pairs from k on, for shortest-first.
        self._left = [0] * (len(self.costs) + 1)
        for k in range(len(self.costs) - 1, -1, -1):
            self._left[k] = self._left[k + 1] + self.costs[k].tokens + self.costs[k].patches

    @property
    def left(self) -> int:
        return self._left[self.next]

    @property
    def waiting(self) -> bool:
        return self.next < len(self.pairs)


class Scheduler:
    """One model thread around `score_fn(pairs) -> (scores, token_counts)` and, for explanations,
    `explain_fn(items) -> [explanation per item]`.

    `on_pass(pairs, tokens, patches, seconds)`, `on_explain(explanations, seconds)` and
    `on_drop(reason, pairs)` report to metrics;
    `on_idle()` runs on the model thread once the queue has emptied after work (to return memory),
    and again a moment later while it returns False (it deferred)."""

    def __init__(self, score_fn: ScoreFn, *, explain_fn: ExplainFn | None = None, max_queue: int = 64,
                 max_pass_pairs: int = 16, max_pass_tokens: int = 8192, max_pass_patches: int = 8192,
                 batch_wait_s: float = 0.002,
                 on_pass: Callable | None = None, on_explain: Callable | None = None,
                 on_drop: Callable | None = None, on_idle: Callable | None = None):
        assert max_queue >= 1 and max_pass_pairs >= 1 and max_pass_tokens >= 1 and max_pass_patches >= 1
        self.score_fn, self.explain_fn = score_fn, explain_fn
        self.max_queue, self.max_pass_pairs = max_queue, max_pass_pairs
        self.max_pass_tokens, self.max_pass_patches = max_pass_tokens, max_pass_patches
        self.batch_wait_s = max(batch_wait_s, 0.0)
        self.on_pass, self.on_explain, self.on_drop, self.on_idle = on_pass, on_explain, on_drop, on_idle
        self._jobs: list[_Job] = []  # every request with pairs not yet delivered
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._seconds_per_pair = 0.05  # running estimate, for Retry-After
        self.stats = {"passes": 0, "pairs": 0, "explained": 0, "expired": 0, "cancelled": 0, "refused": 0}

    # -- request side (event loop) ------------------------------------------------

    async def score(self, pairs: list, deadline: float, costs: list[Cost] | None = None
                    ) -> tuple[list[float], list[int]]:
        """Scores and token counts of `pairs`; see `_submit`."""
        results = await self._submit("score", pairs, deadline, costs)
        return [s for s, _ in results], [t for _, t in results]

    async def explain(self, items: list, deadline: float, costs: list[Cost] | None = None) -> list:
        """`explain_fn`'s explanation of each item; see `_submit`."""
        assert self.explain_fn is not None, "this Scheduler was made without an explain_fn"
        return await self._submit("explain", items, deadline, costs)

    async def _submit(self, kind: str, pairs: list, deadline: float, costs: list[Cost] | None) -> list:
        """Run `pairs` on the model thread; raise Overloaded or DeadlineExceeded instead of hanging.
        Cancelling the awaiting task (a disconnect) drops the request's remaining pairs."""
        if self._stopping:
            raise Overloaded("server is shutting down", retry_after=5)
        self._ensure_started()
        loop = asyncio.get_running_loop()
        costs = costs if costs is not None else [Cost(1)] * len(pairs)
        assert len(costs) == len(pairs)
        job = _Job(kind, list(pairs), list(costs), deadline, time.monotonic(), loop, loop.create_future())
        with self._cond:
            if sum(j.waiting for j in self._jobs) >= self.max_queue:
                self.stats["refused"] += 1
                raise Overloaded(f"server is busy: {self.max_queue} requests already queued",
                                 retry_after=self._retry_after_locked())
            self._jobs.append(job)
            self._cond.notify()
        try:
            # On timeout wait_for cancels the future; the model thread sees that and drops the job.
            return await asyncio.wait_for(job.future, max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise DeadlineExceeded() from None
        finally:
            job.future.cancel()  # a no-op once settled; on a disconnect, tells the model thread

    def retry_after(self) -> int:
        with self._cond:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> int:
        """Seconds until the queue has probably drained: queued pairs x seconds per pair."""
        queued = sum(len(j.pairs) - j.next for j in self._jobs)
        return int(min(max(math.ceil(queued * self._seconds_per_pair), 1), 60))

    @property
    def queued(self) -> int:
        """Requests with pairs not yet taken into a pass."""
        with self._cond:
            return sum(j.waiting for j in self._jobs)

    @property
    def queued_pairs(self) -> int:
        with self._cond:
            return sum(len(j.pairs) - j.next for j in self._jobs)

    @property
    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()  # not started yet counts as healthy

    # -- lifecycle -----------------------------------------------------------------

    def _ensure_started(self) -> None:
        # Started lazily so that the app works with or without ASGI lifespan events.
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="m0lite-model", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the pass in hand, refuse whatever is still queued, end the model thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            jobs, self._jobs = self._jobs, []
        for job in jobs:
            self._fail(job, Overloaded("server is shutting down", retry_after=5))

    # -- model thread ------------------------------------------------------------

    def _run(self) -> None:
        idle_pending = False  # work was done since on_idle last ran to completion
        while True:
            with self._cond:
                while not self._stopping and not any(j.waiting for j in self._jobs):
                    if idle_pending:
                        self._cond.release()  # on_idle may take a while; requests must still queue
                        try:
                            idle_pending = not self._idle()
                        finally:
                            self._cond.acquire()
                        if any(j.waiting for j in self._jobs):
                            break  # queued meanwhile: its notify came while nobody waited
                    self._cond.wait(0.2)
                if self._stopping:
                    return
                if self.batch_wait_s and sum(len(j.pairs) - j.next for j in self._jobs) < self.max_pass_pairs:
                    self._cond.wait(self.batch_wait_s)  # a moment for more requests to share the pass
                work = self._take_pass()
            if work:
                try:
                    self._score(work)
                except BaseException as e:  # never let the one model thread die
                    log.exception("pass failed unexpectedly")
                    for job in {id(j): j for j, _ in work}.values():
                        self._fail(job, e)
            idle_pending = True

    def _idle(self) -> bool:
        """Run on_idle (the queue is empty); True once it has done its work (it may defer)."""
        if self.on_idle is None:
            return True
        try:
            return self.on_idle() is not False
        except Exception:
            log.exception("on_idle failed")
            return True

    def _live(self, job: _Job) -> bool:
        """Still worth scoring: not failed, not abandoned by its waiter, not past its deadline."""
        if job.failed:
            return False
        if job.future.done():  # the waiter gave up: deadline (wait_for) or a disconnect
            self._drop(job, "cancelled")
            return False
        if time.monotonic() > job.deadline:
            self._drop(job, "expired")
            self._fail(job, DeadlineExceeded())
            return False
        return True

    def _drop(self, job: _Job, reason: str) -> None:
        left = len(job.pairs) - job.next
        job.failed = True
        job.next = len(job.pairs)
        self.stats[reason] += 1
        if self.on_drop is not None and left:
            self.on_drop(reason, left)

    def _take_pass(self) -> list[tuple[_Job, int]]:
        """Pairs for one pass (called under the lock), shortest request first until the pass budget
        is spent; a request that got nothing from the last pass first gets one pair, so that none
        starves. A pair over the budget alone runs alone."""
        self._jobs = [j for j in self._jobs if self._live(j)]  # no pair is in flight here
        waiting = [j for j in self._jobs if j.waiting]
        if not waiting:
            return []
        work: list[tuple[_Job, int]] = []
        spent = [0, 0]  # tokens, patches

        def take(job: _Job, most: int) -> None:
            while job.waiting and most and len(work) < self.max_pass_pairs:
                c = job.costs[job.next]
                if work and (spent[0] + c.tokens > self.max_pass_tokens or spent[1] + c.patches > self.max_pass_patches):
                    return
                work.append((job, job.next))
                job.next += 1
                spent[0] += c.tokens
                spent[1] += c.patches
                most -= 1

        for job in sorted((j for j in waiting if j.starved), key=lambda j: j.arrival):
            take(job, 1)
        for job in sorted(waiting, key=lambda j: (j.left, j.arrival)):
            take(job, len(job.pairs))
        served = {id(job) for job, _ in work}
        for job in waiting:
            job.starved = 0 if id(job) in served else job.starved + 1
        return work

    def _score(self, work: list[tuple[_Job, int]]) -> None:
        """One pass: its score items in one call of score_fn, then its explain items in one of explain_fn."""
        for kind in KINDS:
            part = [(job, i) for job, i in work if job.kind == kind]
            if part:
                self._run_part(kind, part)
        self.stats["passes"] += 1
        with self._cond:
            self._jobs = [j for j in self._jobs if not j.failed and j.done < len(j.pairs)]

    def _run_part(self, kind: str, work: list[tuple[_Job, int]]) -> None:
        t0 = time.perf_counter()
        try:
            results = self._call(kind, [job.pairs[i] for job, i in work])
        except Exception as e:
            if len({id(job) for job, _ in work}) == 1:
                self._fail(work[0][0], e)
                return
            # One request's bad pair must not fail the others: run each request's part alone.
            results = self._retry_per_job(kind, work)
        seconds = time.perf_counter() - t0
        done = 0
        for (job, i), result in zip(work, results):
            if result is None or job.failed:
                continue
            job.results[i] = result
            job.done += 1
            done += 1
            job.pairs[i] = None  # the pair's inputs (a decoded image) are no longer needed
            if job.done == len(job.pairs):
                self._deliver(job, job.results)
        if kind == "explain":
            self.stats["explained"] += done
            if self.on_explain is not None:
                self.on_explain(done, seconds)
            return
        self._seconds_per_pair = 0.8 * self._seconds_per_pair + 0.2 * seconds / len(work)
        self.stats["pairs"] += done
        if self.on_pass is not None:
            self.on_pass(len(work), sum(r[1] for r in results if r is not None),
                         sum(job.costs[i].patches for job, i in work), seconds)

    def _call(self, kind: str, pairs: list) -> list:
        if kind == "explain":
            explanations = list(self.explain_fn(pairs))
            if len(explanations) != len(pairs):
                raise RuntimeError(f"explain_fn returned {len(explanations)} explanations for {len(pairs)} pairs")
            return explanations
        scores, tokens = self.score_fn(pairs)
        if len(scores) != len(pairs) or len(tokens) != len(pairs):
            raise RuntimeError(f"score_fn returned {len(scores)} scores and {len(tokens)} token counts "
                               f"for {len(pairs)} pairs")
        return [(float(s), int(t)) for s, t in zip(scores, tokens)]

    def _retry_per_job(self, kind: str, work: list[tuple[_Job, int]]) -> list:
        results: list = [None] * len(work)
        for job in {id(j): j for j, _ in work}.values():
            at = [k for k, (j, _) in enumerate(work) if j is job]
            try:
                for k, r in zip(at, self._call(kind, [job.pairs[work[k][1]] for k in at])):
                    results[k] = r
            except Exception as e:
                self._fail(job, e)
        return results

    def _fail(self, job: _Job, error: BaseException) -> None:
        job.failed = True
        job.next = len(job.pairs)
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
