"""``create_app(settings)``: the Sanic application — routes, the upgrade gate, per-worker
listeners.  ``app`` is built from the environment on first access so that ``sanic
service.app`` works; a configuration error prints one clear line and exits with status 2."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import sys
import time
from typing import Any

from sanic import Request, Sanic
from sanic.handlers import ErrorHandler
from sanic.helpers import STATUS_CODES
from sanic.response import HTTPResponse, json, raw

from . import __version__, _manager, _shutdown, metrics, privacy
from .config import ConfigError, Settings
from .errors import Close
from .runtime import Runtime
from .transport import WS_PATH, upgrade_gate, websocket_handler

log = logging.getLogger("signaling")


def _configure_logging(verbose: bool) -> None:
    """Our own logger, on stderr like Sanic's; the privacy filter is added by install()."""
    logger = logging.getLogger("signaling")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
        )
        logger.addHandler(handler)
    if verbose:
        logging.getLogger("sanic.root").setLevel(logging.DEBUG)


def create_app(settings: Settings, name: str = "signaling") -> Sanic:
    _shutdown.install()  # Sanic's SIGTERM handler can kill its own main process
    _manager.install()  # and its manager read every worker's state ten times a second
    app = Sanic(name)
    _configure_logging(settings.verbose)
    app.config.ACCESS_LOG = False  # it prints client ip:port and full URLs
    app.config.WEBSOCKET_MAX_SIZE = settings.max_message_bytes  # 1009 beyond
    app.config.update(
        {
            "WEBSOCKET_PING_INTERVAL": settings.ws_ping_interval or None,
            "WEBSOCKET_PING_TIMEOUT": settings.ws_ping_timeout or None,
        }
    )
    app.config.API_TITLE = "Liberty Reach Signaling"
    app.config.API_VERSION = __version__
    app.config.API_DESCRIPTION = "HTTP endpoints; the WebSocket protocol is docs/PROTOCOL.md"
    app.config.OAS_UI_DEFAULT = "swagger"
    app.config.OAS_URL_PREFIX = "/docs"
    # sanic-ext's worker health monitor is left off: its extra process made shutdown
    # intermittently exit 1 (EOFError in the health queue) in our tests.
    app.config.HEALTH = False
    app.config.FALLBACK_ERROR_FORMAT = "json"
    # Sanic's own limit for the whole stop; our drain runs inside it (k8s grace must exceed it)
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = settings.graceful_shutdown_timeout
    app.error_handler = PlainErrorHandler()
    app.ctx.settings = settings
    privacy.install()

    app.on_request(upgrade_gate, priority=100)
    app.add_websocket_route(websocket_handler, WS_PATH, name="ws")
    app.add_route(health, "/health", methods=["GET"], name="health")
    app.add_route(ready, "/ready", methods=["GET"], name="ready")
    app.add_route(metrics_endpoint, "/metrics", methods=["GET"], name="metrics")

    app.main_process_start(_main_start)
    app.before_server_start(_worker_start)
    app.before_server_stop(_worker_drain)
    app.after_server_stop(_worker_stop)
    return app


_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 426: "upgrade_required"}


class PlainErrorHandler(ErrorHandler):
    """Error pages that never echo the request (Sanic's debug pages include its query
    arguments, i.e. a ``?token=``): status, a code and a generic message only."""

    def default(self, request: Request, exception: Exception) -> HTTPResponse:
        self.log(request, exception)  # the privacy filter scrubs what Sanic logs
        status = int(getattr(exception, "status_code", 500) or 500)
        code = _HTTP_ERROR_CODES.get(status, "internal" if status >= 500 else "bad_request")
        return json({"error": code, "message": STATUS_CODES.get(status, b"").decode()},
                    status=status)


# ---------------------------------------------------------------- HTTP endpoints


async def health(request: Request) -> HTTPResponse:
    """Liveness: 200 while the process runs."""
    return json({"status": "healthy", "timestamp": int(time.time())})


async def ready(request: Request) -> HTTPResponse:
    """Readiness: 200 when the backplane answers and the instance is not draining."""
    rt: Runtime = request.app.ctx.runtime
    ok = await rt.ready()
    body = {
        "status": "ready" if ok else "unavailable",
        "backplane": "redis" if rt.clustered else "memory",
        "draining": rt.draining,
        "timestamp": int(time.time()),
    }
    return json(body, status=200 if ok else 503)


async def metrics_endpoint(request: Request) -> HTTPResponse:
    """Prometheus text format for the whole instance (all workers)."""
    body, content_type = metrics.render()
    return raw(body, content_type=content_type)


# ---------------------------------------------------------------- listeners


async def _main_start(app: Sanic) -> None:
    """Main process: refuse several workers without a shared backplane; create the
    instance-wide drain flag the workers share."""
    privacy.install()
    settings: Settings = app.ctx.settings
    app.shared_ctx.draining = multiprocessing.get_context("spawn").RawValue("b", 0)
    workers = int(getattr(app.state, "workers", 1) or 1)
    if settings.redis_url is None:
        if workers > 1:
            print(
                f"error: {workers} workers need a shared backplane: set REDIS_URL (or "
                "REDIS_ADDR), or run one worker",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(2)
        log.info("no REDIS_URL: running as a single instance on the in-process backplane")


# Cyclic-GC thresholds of a worker (CPython's default: 700, 10, 10).  The routing path makes
# no cyclic garbage (measured: a full collection after a run under load finds nothing), but
# with the defaults the objects of messages in flight outlive two young collections, reach
# the old generation, and trigger a full collection of every connection's objects every
# second or two: at 10,000 connections 0.4 s each, 45 % of the worker's CPU.  The thresholds
# count net allocations, so in a steady state collections become rare.  A closed connection
# makes no cyclic garbage either (``transport.untie_when_done``); the GC stays on for what
# third-party code may still leave in cycles (an exception's traceback, say).
GC_THRESHOLDS = (20_000, 20, 10)


def tune_gc() -> None:
    """Freeze what start-up allocated (never garbage, never scanned again) and raise the
    collection thresholds; call once per worker process, after start-up."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _worker_start(app: Sanic) -> None:
    privacy.install()
    rt = Runtime.build(app.ctx.settings)
    rt.instance_drain = getattr(app.shared_ctx, "draining", None)
    rt.serving()
    app.ctx.runtime = rt
    try:
        await rt.start()
    except Exception as exc:
        # Start anyway: /ready says 503 and the heartbeat keeps trying to reach Redis.
        log.error("backplane not reachable at start: %s", type(exc).__name__)
        app.add_task(_retry_start(rt), name="retry-start")
    tune_gc()
    log.info(
        "worker %s serving (%s backplane)", rt.node_id, "redis" if rt.clustered else "memory"
    )


async def _retry_start(rt: Runtime) -> None:
    delay = 0.5
    while True:
        await asyncio.sleep(delay)
        try:
            await rt.start()
            log.info("backplane reachable again; worker %s started", rt.node_id)
            return
        except Exception:
            delay = min(delay * 2, 5.0)


async def _worker_drain(app: Sanic) -> None:
    """SIGTERM, first step (``before_server_stop`` runs before Sanic's own stop, which would
    close sockets with 1001): /ready and new upgrades answer 503 at once, every open socket
    is closed with 1012 ("restarting — reconnect"), spread over DRAIN_SECONDS so that the
    clients do not all reconnect in the same instant, then the handlers get the rest of
    GRACEFUL_SHUTDOWN_TIMEOUT to finish."""
    rt: Runtime | None = getattr(app.ctx, "runtime", None)
    if rt is None:
        return
    rt.start_draining()
    settings = rt.settings
    started = time.monotonic()
    sessions = list(rt.hub.all_sessions())
    log.info("draining %d connections over %.1f s", len(sessions), settings.drain_seconds)
    # at most one batch every 50 ms; the batches evenly spaced over DRAIN_SECONDS
    per_batch = max(1, -(-len(sessions) // max(1, int(settings.drain_seconds / 0.05))))
    groups = max(1, -(-len(sessions) // per_batch))
    pause = settings.drain_seconds / groups
    for i in range(0, len(sessions), per_batch):
        for session in sessions[i : i + per_batch]:
            session.close(Close.RESTART, "server restarting; reconnect")
        if i + per_batch < len(sessions):
            await asyncio.sleep(pause)
    # handlers clean up (presence, rooms) on their own; leave a margin for Sanic's stop
    deadline = started + max(settings.graceful_shutdown_timeout - 1.0, settings.drain_seconds)
    while rt.hub.connection_count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _worker_stop(app: Sanic) -> None:
    rt: Runtime | None = getattr(app.ctx, "runtime", None)
    if rt is not None:
        await rt.close()
    metrics.flush()
    metrics.worker_exited()


def build_from_env() -> Sanic:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return create_app(settings)


def __getattr__(name: str) -> Any:
    """``service.app.app`` is built from the environment on first access (``sanic
    service.app`` asks for it); importing this module for ``create_app`` needs no env."""
    if name == "app":
        built = build_from_env()
        globals()["app"] = built
        return built
    raise AttributeError(name)
