"""Every Prometheus object of the service.  Labels are bounded enums (message type, error
code, backend operation) — never a user, device, room, token or address.  ``render()``
answers ``/metrics`` for the whole instance: every worker process writes its samples to
PROMETHEUS_MULTIPROC_DIR and the collector merges them."""

from __future__ import annotations

import asyncio
import bisect
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


# The per-message counters are summed in plain ints and written to the (multiprocess, mmap)
# metrics once per FLUSH_S: a Prometheus write costs more than routing a message does.
FLUSH_S = 0.5


_LATENCY_BOUNDS: list[float] = list(LATENCY._upper_bounds)  # ends with +Inf


class _Batch:
    def __init__(self) -> None:
        self.received: dict[str, int] = {}
        self.sent = 0
        # the latency histogram summed here: observations per bucket, and their sum
        self.buckets = [0] * len(_LATENCY_BOUNDS)
        self.latency_sum = 0.0
        self.scheduled = False

    def schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            try:
                asyncio.get_running_loop().call_later(FLUSH_S, self.flush)
            except RuntimeError:  # no loop (a synchronous caller): write at once
                self.flush()

    def flush(self) -> None:
        self.scheduled = False
        received, self.received = self.received, {}
        for kind, n in received.items():
            _RECEIVED_BY_TYPE.get(kind, _RECEIVED_BY_TYPE["invalid"]).inc(n)
        if self.sent:
            SENT.inc(self.sent)
            self.sent = 0
        if self.latency_sum or any(self.buckets):
            # What ``observe`` does per value, once per bucket (a write per observation to
            # the multiprocess files cost ~2 µs, per delivered message)
            LATENCY._sum.inc(self.latency_sum)
            for i, n in enumerate(self.buckets):
                if n:
                    LATENCY._buckets[i].inc(n)
            self.buckets = [0] * len(_LATENCY_BOUNDS)
            self.latency_sum = 0.0


_BATCH = _Batch()


def count_sent(frames: int) -> None:
    """Frames written to clients (batched like the core's counters)."""
    if frames:
        _BATCH.sent += frames
        _BATCH.schedule()


def flush() -> None:
    """Write the batched counts now (a worker's stop listener calls this)."""
    _BATCH.flush()


class PromStats:
    """The core's Stats contract on the objects above."""

    def received(self, kind: str) -> None:
        batch = _BATCH
        received = batch.received
        received[kind] = received.get(kind, 0) + 1
        if not batch.scheduled:  # once per flush period, not a call per message
            batch.schedule()

    def error(self, code: str) -> None:
        ERRORS.labels(code).inc()

    def rate_limited(self) -> None:
        RATE_LIMITED.inc()

    def delivered(self, latency_s: float) -> None:
        batch = _BATCH
        batch.buckets[bisect.bisect_left(_LATENCY_BOUNDS, latency_s)] += 1  # le: inclusive
        batch.latency_sum += latency_s
        batch.schedule()

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
