"""Every Prometheus object of the service.  Labels are bounded enums (message type, error
code, backend operation) — never a user, device, room, token or address.  ``render()``
answers ``/metrics`` for the whole instance: every worker process writes its samples to
PROMETHEUS_MULTIPROC_DIR and the collector merges them."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from .protocol import KNOWN_TYPES

ACTIVE = Gauge(
    "signaling_active_connections",
    "Open WebSocket connections of this instance",
    multiprocess_mode="livesum",
)
SENT = Counter("signaling_messages_sent_total", "Frames written to clients")
RECEIVED = Counter(
    "signaling_messages_received_total", "Frames received from clients, by message type", ["type"]
)
RATE_LIMITED = Counter(
    "signaling_rate_limit_exceeded_total", "Client messages refused by the per-user rate limit"
)
DURATION = Histogram(
    "signaling_connection_duration_seconds",
    "Lifetime of WebSocket connections",
    buckets=(1, 5, 15, 30, 60, 300, 900, 1800, 3600, 7200),
)
LATENCY = Histogram(
    "signaling_delivery_latency_seconds",
    "From acceptance by the sender's worker to the recipient's outbox, across workers",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
BACKPLANE_ERRORS = Counter(
    "signaling_backplane_errors_total", "Failed Redis operations, by operation", ["op"]
)
ERRORS = Counter("signaling_errors_total", "error frames sent, by code", ["code"])
REJECTED = Counter(
    "signaling_upgrades_rejected_total", "Upgrades refused before the handshake, by code", ["code"]
)

_TYPES = KNOWN_TYPES | {"invalid", "binary"}
_RECEIVED_BY_TYPE = {t: RECEIVED.labels(t) for t in _TYPES}


class PromStats:
    """The core's Stats contract on the objects above."""

    def received(self, kind: str) -> None:
        _RECEIVED_BY_TYPE.get(kind, _RECEIVED_BY_TYPE["invalid"]).inc()

    def error(self, code: str) -> None:
        ERRORS.labels(code).inc()

    def rate_limited(self) -> None:
        RATE_LIMITED.inc()

    def delivered(self, latency_s: float) -> None:
        LATENCY.observe(latency_s)

    def backplane_error(self, op: str) -> None:
        BACKPLANE_ERRORS.labels(op).inc()


def render() -> tuple[bytes, str]:
    """The exposition for the whole instance (all worker processes)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def worker_exited(pid: int | None = None) -> None:
    """Drop a stopped worker's live gauges; call from the worker's last stop listener."""
    multiprocess.mark_process_dead(pid or os.getpid())
