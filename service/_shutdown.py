"""A SIGTERM that Sanic's main process survives.

Sanic 25.12's worker manager handles SIGTERM inside the signal handler: it writes each
worker's state to the shared ``worker_state`` table, a ``multiprocessing`` manager proxy.
The main thread polls that same proxy every 0.1 s (``_sync_states``), and a handler that
runs in the middle of one of those calls sends its own request on the same connection:
the replies cross, the handler reads ``None`` for a worker's entry, and the main process
dies (``TypeError: 'NoneType' object is not a mapping``, then ``'str' object has no
attribute 'get'``).  Its workers still get SIGINT, but the instance has gone: the drain's
``/ready`` 503 and its 1012 closes spread over DRAIN_SECONDS are lost (seen twice in CI
under the full suite).

``install()`` replaces the handler with one that makes no proxy call: it marks each live
worker terminated in this process only, sends it SIGINT as Sanic does, and tells the
monitor loop to stop.  The main thread then finishes as before (its loop ends on the
message, ``cleanup`` waits for the workers and removes their entries); a second signal
still kills the workers (Sanic's own handler).
"""

from __future__ import annotations

import contextlib
import logging
import os
from signal import SIGINT, Signals
from types import FrameType
from typing import Any

from sanic.worker.constants import ProcessState
from sanic.worker.manager import WorkerManager

log = logging.getLogger("sanic.root")

_sanic_handler = WorkerManager.shutdown_signal


def _shutdown_signal(manager: Any, signum: int, frame: FrameType | None) -> None:
    if manager._shutting_down:
        _sanic_handler(manager, signum, frame)  # the second signal: kill, as Sanic does
        return
    log.info("Received signal %s. Shutting down.", Signals(signum).name)
    manager._shutting_down = True
    for process in manager.processes:
        if process.is_alive() and process.state is not ProcessState.TERMINATED:
            process.state = ProcessState.TERMINATED  # here only: no proxy call
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(process.pid, SIGINT)
    manager.monitor_publisher.send(None)  # the monitor loop ends at its next poll


def install() -> None:
    """Use ``_shutdown_signal`` for managers made from now on (Sanic binds the handler when
    it makes its manager, in ``serve``).  Safe to call more than once."""
    WorkerManager.shutdown_signal = _shutdown_signal  # type: ignore[method-assign]
