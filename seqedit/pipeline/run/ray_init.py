"""Joining Ray: the cluster at RAY_ADDRESS, or an embedded local instance."""

from __future__ import annotations

import logging
import os
import time

import ray

log = logging.getLogger(__name__)

CLIENT_START_TRIES = 3
"""Tries at joining through a Ray Client address (ray://): the cluster's proxier forks one
client server per connection, and that fork dies now and then (ray-project/ray#63202, a
gRPC race, about 7% of connections), which the client sees as ConnectionAbortedError
"Initialization failure from server ... Starting Ray client server failed". A new
connection forks a new server, so the join is tried again."""


def ensure_ray(*, retry_wait: float = 2.0) -> None:
    """Join the cluster at RAY_ADDRESS, or start an embedded local Ray instance."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    tries = CLIENT_START_TRIES if (address or "").startswith("ray://") else 1
    for attempt in range(1, tries + 1):
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                # the embedded instance is private to this process: keep its start-up quiet
                logging_level=logging.WARNING if address else logging.ERROR,
            )
            return
        except ConnectionAbortedError as exc:
            if attempt == tries or "Starting Ray client server failed" not in str(exc):
                raise
            log.warning(
                "the Ray Client server at %s failed to start (try %d of %d; "
                "ray-project/ray#63202): trying again", address, attempt, tries,
            )  # fmt: skip
            time.sleep(retry_wait)
