"""The Celery settings each broker gets: Redis's visibility timeout is the ledger's lease;
RabbitMQ has none (it redelivers when a consumer goes away) but confirms publishes and
has a consumer_timeout that a long job must stay under."""

from __future__ import annotations

from dicomnode.config import Settings, parse_settings
from dicomnode.jobs.celery_engine import (
    consumer_timeout_warning,
    lease_s,
    make_app,
    transport_options,
)


def _settings(broker: str, timeout_s: float = 600) -> Settings:
    return parse_settings({"jobs": {"engine": "celery", "broker": broker,
                                    "timeout_s": timeout_s}})


def test_redis_messages_come_back_after_the_lease() -> None:
    settings = _settings("redis://127.0.0.1:6379/0")
    assert transport_options(settings) == {"visibility_timeout": lease_s(settings)}
    assert make_app(settings).conf.broker_transport_options == {"visibility_timeout": 755.0}
    assert consumer_timeout_warning(_settings("redis://q/0", timeout_s=7200)) is None


def test_rabbitmq_confirms_publishes_and_has_no_visibility_timeout() -> None:
    for url in ("amqp://guest@127.0.0.1:5672//", "amqps://q.example.org//"):
        settings = _settings(url)
        assert transport_options(settings) == {"confirm_publish": True}
        assert make_app(settings).conf.broker_transport_options == {"confirm_publish": True}


def test_a_job_longer_than_rabbitmqs_consumer_timeout_is_warned_about() -> None:
    assert consumer_timeout_warning(_settings("amqp://q//", timeout_s=1400)) is None
    warning = consumer_timeout_warning(_settings("amqp://q//", timeout_s=3600))
    assert warning is not None
    assert "consumer_timeout" in warning and "4505000" in warning  # (1.25 × 3600 + 5) s
