"""The retrying actor pool: its failure policy without a cluster, and the pool itself on
local Ray with stand-in actors that die when told (a dead actor is replaced, its unanswered
tasks go to the new one in order, and the policy says when to give up)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray

from seqedit.pipeline.run.actor_pool import ActorPoolError, FailurePolicy, RetryingActorPool

# --- the policy, no Ray --------------------------------------------------------------------


def test_no_limits_replaces_every_dead_actor() -> None:
    policy = FailurePolicy()
    assert all(policy.actor_died([5, 9]) is None for _ in range(100))
    assert policy.deaths == 100


def test_max_deaths_counts_every_actor_of_the_pool() -> None:
    policy = FailurePolicy(max_deaths=2)
    assert policy.actor_died([1]) is None
    assert policy.actor_died([]) is None  # an actor found dead with nothing unanswered
    reason = policy.actor_died([1])
    assert reason is not None and "died 3 times" in reason


def test_max_tries_gives_up_on_a_task_whose_actor_died_that_often() -> None:
    policy = FailurePolicy(max_tries=3)
    assert policy.actor_died([1, 2]) is None  # each task handed out fewer than 3 times
    reason = policy.actor_died([1, 3])
    assert reason is not None and "handed out 3 times" in reason
    assert policy.deaths == 2


# --- the pool, on local Ray ------------------------------------------------------------------


class Echo:
    """Stands in for a worker: answers a task with itself, or exits its process when the
    task is ("die", marker) and the marker file is not there yet (it is written first, so
    the task kills one actor only), or ("die", None) (every time)."""

    def answer(self, task: object) -> object:
        if isinstance(task, tuple) and task[0] == "die":
            marker = task[1]
            if marker is None or not Path(marker).exists():
                if marker is not None:
                    Path(marker).touch()
                os._exit(1)
        return task


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


def _pool(size: int, policy: FailurePolicy, per_actor: int | None = None) -> RetryingActorPool:
    return RetryingActorPool(
        lambda: ray.remote(Echo).options(num_cpus=0, max_restarts=0).remote(),
        size,
        lambda actor, task: actor.answer.remote(task),
        policy=policy,
        per_actor=per_actor,
        name="echo",
    )


def test_a_dead_actors_tasks_go_to_its_replacement_in_order(
    ray_local: None, tmp_path: Path
) -> None:
    pool = _pool(2, FailurePolicy(max_deaths=1))
    try:
        dying = ("die", str(tmp_path / "died"))
        for task in [0, 1, dying, 3, 4, 5]:  # least busy first: 0, die, 4 and 1, 3, 5
            pool.submit(task)
        before = pool.handles
        answers = pool.drain()
        assert all(task == answer for task, answer in answers)
        tasks = [task for task, _ in answers]
        assert [t for t in tasks if t in (0, dying, 4)] == [0, dying, 4]  # in order, once
        assert [t for t in tasks if t in (1, 3, 5)] == [1, 3, 5]
        assert (pool.deaths, pool.n_pending) == (1, 0)
        # die and 4 go out again, and 0 too when its answer was lost with its actor
        assert pool.resubmitted in (2, 3)
        assert pool.handles[0] is not before[0] and pool.handles[1] is before[1]
    finally:
        pool.close()


def test_one_task_per_actor_waits_in_a_queue_and_every_task_is_answered_once(
    ray_local: None,
) -> None:
    pool = _pool(2, FailurePolicy(), per_actor=1)
    try:
        for task in range(7):
            pool.submit(task)
        assert pool.n_pending == 7 and len(pool.queue) == 5
        answers = pool.drain()
        assert sorted(task for task, _ in answers) == list(range(7))
        pool.submit(7)
        pool.drop(lambda task: task == 7)
        assert pool.n_pending == 0 and pool.drain() == []
    finally:
        pool.close()


def test_a_task_that_kills_every_actor_is_given_up(ray_local: None) -> None:
    pool = _pool(1, FailurePolicy(max_tries=2), per_actor=1)
    try:
        pool.submit(("die", None))
        with pytest.raises(ActorPoolError, match=r"echo: a task was handed out 2 times"):
            pool.drain()
        assert pool.deaths == 2 and pool.resubmitted == 1
    finally:
        pool.close()
