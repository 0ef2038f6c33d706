"""Joining Ray: the cluster at RAY_ADDRESS, or an embedded local instance."""

from __future__ import annotations

import logging
import os

import ray


def ensure_ray() -> None:
    """Join the cluster at RAY_ADDRESS, or start an embedded local Ray instance."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            # the embedded instance is private to this process: keep its start-up quiet
            logging_level=logging.WARNING if address else logging.ERROR,
        )
