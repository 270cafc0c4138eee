"""Sanic's worker manager, reading its workers' states less often.

The manager's main process loops on a 0.1 s poll of its monitor pipe and, after every
poll, reads each worker's state through a ``multiprocessing`` manager proxy
(``_sync_states``): a round trip to the proxy's own process per worker, ten times a
second.  With no connection at all that was 0.95 % of a core for an instance of one worker
and 2.3 % for eight (the main process and the proxy's), more than the workers' own idle
cost.  ``install()`` lets the sync run at most every ``SYNC_EVERY_S``: messages to the
manager (restart, scale, terminate) still wake its poll at once, and a worker that died
is noticed within a second instead of a tenth.
"""

from __future__ import annotations

import time
from typing import Any

from sanic.worker.manager import WorkerManager

SYNC_EVERY_S = 1.0

_sanic_sync = WorkerManager._sync_states


def _sync_states(manager: Any) -> None:
    now = time.monotonic()
    if now < getattr(manager, "_signaling_next_sync", 0.0):
        return
    manager._signaling_next_sync = now + SYNC_EVERY_S
    _sanic_sync(manager)


def install() -> None:
    """Use the rate-limited sync for every manager (Sanic calls it from its monitor loop
    only).  Safe to call more than once."""
    WorkerManager._sync_states = _sync_states  # type: ignore[method-assign]
