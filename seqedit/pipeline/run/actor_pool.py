"""A fixed number of like actors fed with tasks, where a dead actor is replaced and its
unanswered tasks are handed out again: the mechanism the evaluator pool (`eval_pool`) and
the stats job (`stats_job`) share. What their tasks are, and what is done with the
answers, stays with them.

A task goes to the actor with the fewest unanswered tasks (below `per_actor`, if set; else
it waits in a queue). An actor answers its tasks in the order it got them, so tasks
submitted in order reach every actor in order. An actor found dead (any of `ACTOR_DIED`)
is killed and replaced in its place, and its unanswered tasks go to the new actor, in the
order the dead one got them, unless `FailurePolicy` says to give up. The policy is a plain
class, tested without Ray.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import ray

from seqedit.pipeline.run.actors import ACTOR_DIED

log = logging.getLogger(__name__)

T = TypeVar("T")  # what a task is: the pool's user knows, the pool only hands it out

ActorHandle = Any  # ray.actor.ActorHandle, or any stand-in a test gives


class ActorPoolError(RuntimeError):
    """Actors of a pool died more often than its `FailurePolicy` allows."""


@dataclass
class FailurePolicy:
    """When a pool stops replacing dead actors and raises instead.

    `max_deaths`: the pool gives up when more actors than this have died in all (None: no
    limit). `max_tries`: it gives up when an actor dies holding a task that was handed out
    this many times already, each time to an actor that died (None: no limit).
    """

    max_deaths: int | None = None
    max_tries: int | None = None
    deaths: int = 0

    def actor_died(self, tries: Sequence[int]) -> str | None:
        """Count one dead actor whose unanswered tasks had each been handed out `tries`
        times; why the pool should give up, or None to replace the actor and hand its
        tasks out again."""
        self.deaths += 1
        if self.max_deaths is not None and self.deaths > self.max_deaths:
            return f"actors died {self.deaths} times (at most {self.max_deaths} are replaced)"
        most = max(tries, default=0)
        if self.max_tries is not None and most >= self.max_tries:
            return f"a task was handed out {most} times and its actor died each time"
        return None


@dataclass
class _Sent(Generic[T]):
    task: T
    tries: int  # times handed out, this one included


@dataclass
class _Slot(Generic[T]):
    """One actor of the pool and its unanswered tasks, in the order it got them."""

    actor: ActorHandle
    sent: dict[ray.ObjectRef, _Sent[T]] = field(default_factory=dict)


class RetryingActorPool(Generic[T]):
    """`size` actors made by `start`, each task run as `call(actor, task)` (an object
    reference to the answer); answers come back by `collect`, as (task, answer)."""

    def __init__(
        self,
        start: Callable[[], ActorHandle],
        size: int,
        call: Callable[[ActorHandle, T], ray.ObjectRef],
        *,
        policy: FailurePolicy,
        per_actor: int | None = None,
        name: str = "actor",
        describe: Callable[[T], str] = str,
    ) -> None:
        if size < 1:
            raise ValueError(f"{name} pool of {size} actors: it needs at least one")
        self.start, self.call, self.policy = start, call, policy
        self.per_actor, self.name, self.describe = per_actor, name, describe
        self.queue: deque[_Sent[T]] = deque()
        self.slots = [_Slot(start()) for _ in range(size)]
        self.resubmitted = 0  # tasks handed out again because their actor died

    @property
    def handles(self) -> list[ActorHandle]:
        """The pool's actors now (a replaced one is gone from here)."""
        return [slot.actor for slot in self.slots]

    @property
    def deaths(self) -> int:
        """Actors of this pool found dead so far."""
        return self.policy.deaths

    @property
    def n_pending(self) -> int:
        """Tasks submitted and not collected yet."""
        return len(self.queue) + sum(len(slot.sent) for slot in self.slots)

    def submit(self, task: T) -> None:
        """Hand `task` to the least busy actor (or queue it until one has room)."""
        self.queue.append(_Sent(task, tries=0))
        self._dispatch()

    def _dispatch(self) -> None:
        while self.queue:
            slot = min(self.slots, key=lambda s: len(s.sent))
            if self.per_actor is not None and len(slot.sent) >= self.per_actor:
                return
            self._send(slot, self.queue.popleft())

    def _send(self, slot: _Slot[T], sent: _Sent[T]) -> None:
        sent.tries += 1
        slot.sent[self.call(slot.actor, sent.task)] = sent

    def collect(self, *, block: bool = False) -> list[tuple[T, Any]]:
        """(task, answer) of every task answered so far, in the order each actor got
        them; with `block`, first wait until some task is answered (if any is pending)."""
        if block:
            heads = [next(iter(slot.sent)) for slot in self.slots if slot.sent]
            if heads:
                ray.wait(heads, num_returns=1)
        done: list[tuple[T, Any]] = []
        for index in range(len(self.slots)):
            while self.slots[index].sent:
                sent = self.slots[index].sent
                ref = next(iter(sent))  # an actor answers in the order it got its tasks
                if not ray.wait([ref], timeout=0)[0]:
                    break
                try:
                    answer = ray.get(ref)
                except ACTOR_DIED as exc:
                    self._replace(index, exc)  # a new slot, holding the unanswered tasks
                    continue
                done.append((sent.pop(ref).task, answer))
                self._dispatch()
        return done

    def drain(self) -> list[tuple[T, Any]]:
        """Wait for every submitted task; (task, answer) of each."""
        done: list[tuple[T, Any]] = []
        while self.n_pending:
            done.extend(self.collect(block=True))
        return done

    def drop(self, where: Callable[[T], bool]) -> None:
        """Forget the unanswered tasks for which `where` holds (their actors may still run
        them; the answers are never collected)."""
        self.queue = deque(sent for sent in self.queue if not where(sent.task))
        for slot in self.slots:
            for ref in [ref for ref, sent in slot.sent.items() if where(sent.task)]:
                del slot.sent[ref]
        self._dispatch()

    def _replace(self, index: int, error: BaseException) -> None:
        old = self.slots[index]
        reason = self.policy.actor_died([sent.tries for sent in old.sent.values()])
        if reason is not None:
            unanswered = ", ".join(self.describe(sent.task) for sent in old.sent.values())
            raise ActorPoolError(
                f"{self.name}: {reason} (unanswered: {unanswered or 'none'}); last: {error}"
            ) from error
        log.warning("%s %d died (%s); starting another and handing out its %d task(s) again",
                    self.name, index, error, len(old.sent))  # fmt: skip
        ray.kill(old.actor)
        self.slots[index] = _Slot(self.start())
        for sent in old.sent.values():
            self._send(self.slots[index], sent)
            self.resubmitted += 1
        self._dispatch()

    def close(self) -> None:
        """Stop the actors (unanswered tasks are dropped)."""
        for slot in self.slots:
            ray.kill(slot.actor)
