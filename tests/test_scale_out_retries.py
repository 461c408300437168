"""The Ray router's retries when a replica dies under a request (no cluster: quick)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray.serve")

from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError

from earlyexit.server.scale_out import send_with_retries

pytestmark = pytest.mark.ray

OK = {"status": 200, "answer": {"predictions": []}, "batch": ("r", 1, 1)}


def _sender(outcomes: list):
    """A ``send`` whose successive calls raise or return ``outcomes`` in turn."""
    calls = []

    async def send():
        calls.append(len(calls))
        outcome = outcomes[len(calls) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return send, calls


def test_a_request_whose_replica_died_is_sent_again_and_answered():
    send, calls = _sender([ActorDiedError(), ReplicaUnavailableError("gone"), OK])
    reply, resent = asyncio.run(send_with_retries(send, retries=2, backoff_s=0.0))
    assert reply is OK and resent == 2 and len(calls) == 3


def test_after_the_last_retry_the_client_gets_a_503_that_says_its_replica_stopped():
    send, calls = _sender([ActorDiedError()] * 3)
    reply, resent = asyncio.run(send_with_retries(send, retries=2, backoff_s=0.0))
    assert len(calls) == 3 and resent == 2
    assert reply["status"] == 503 and reply["replica_lost"] is True
    assert "replica serving this request stopped" in reply["answer"]["error"]
    assert "3 tries" in reply["answer"]["error"] and reply["headers"] == {"Retry-After": "1"}


def test_no_retries_answers_at_once():
    send, calls = _sender([ActorDiedError(), OK])
    reply, resent = asyncio.run(send_with_retries(send, retries=0, backoff_s=0.0))
    assert len(calls) == 1 and reply["status"] == 503 and resent == 0


def test_full_queues_are_a_503_without_retrying():
    send, calls = _sender([BackPressureError(num_queued_requests=9, max_queued_requests=8), OK])
    reply, _ = asyncio.run(send_with_retries(send, retries=2, backoff_s=0.0))
    assert len(calls) == 1 and reply["status"] == 503 and "overloaded" in reply["answer"]["error"]


def test_other_errors_are_raised_not_retried():
    send, calls = _sender([ValueError("a bug"), OK])
    with pytest.raises(ValueError, match="a bug"):
        asyncio.run(send_with_retries(send, retries=2, backoff_s=0.0))
    assert len(calls) == 1


def test_retry_settings_are_checked():
    from earlyexit.errors import ConfigError
    from earlyexit.server.scale_out import ScaleOutSettings

    for bad in ({"retries": -1}, {"retry_backoff_s": -0.1}):
        with pytest.raises(ConfigError):
            ScaleOutSettings(**bad)
    assert ScaleOutSettings().retries == 2
