"""ensure_ray: a Ray Client join whose server fork died is tried again; nothing else is."""

from __future__ import annotations

from typing import Any

import pytest
import ray

from seqedit.pipeline.run import ray_init

DIED = ConnectionAbortedError(
    "Initialization failure from server:\nRuntimeError: Starting Ray client server failed."
)


def _fake_init(monkeypatch: pytest.MonkeyPatch, failures: list[Exception]) -> list[Any]:
    calls: list[Any] = []

    def init(**kwargs: Any) -> None:
        calls.append(kwargs["address"])
        if failures:
            raise failures.pop(0)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    return calls


def test_a_client_server_that_died_at_start_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    calls = _fake_init(monkeypatch, [DIED, DIED])
    ray_init.ensure_ray(retry_wait=0)
    assert calls == ["ray://head:10001"] * 3


def test_the_last_try_s_error_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    calls = _fake_init(monkeypatch, [DIED] * ray_init.CLIENT_START_TRIES)
    with pytest.raises(ConnectionAbortedError, match="Starting Ray client server failed"):
        ray_init.ensure_ray(retry_wait=0)
    assert len(calls) == ray_init.CLIENT_START_TRIES


@pytest.mark.parametrize(
    ("address", "error"),
    [
        ("ray://head:10001", ConnectionAbortedError("Initialization failure: version mismatch")),
        ("auto", DIED),
    ],
)
def test_other_failures_are_not_retried(
    monkeypatch: pytest.MonkeyPatch, address: str, error: Exception
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", address)
    calls = _fake_init(monkeypatch, [error])
    with pytest.raises(ConnectionAbortedError):
        ray_init.ensure_ray(retry_wait=0)
    assert calls == [address]
