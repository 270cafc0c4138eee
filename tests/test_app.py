"""The worker's process-level tuning (``service/app.py``)."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import signal
import subprocess
import sys
from typing import Any

from sanic.worker.constants import ProcessState
from sanic.worker.manager import WorkerManager
from sanic.worker.process import WorkerProcess

from service import _shutdown
from service.app import GC_THRESHOLDS, tune_gc
from service.config import Settings
from service.runtime import Runtime


def test_tune_gc_freezes_start_up_and_raises_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]
        assert gc.get_freeze_count() > 0
        assert gc.isenabled()  # tuned, not switched off: connection churn is still collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_one_drain_flag_for_every_worker_of_an_instance() -> None:
    """The first worker to drain turns its siblings' readiness off too; a worker that starts
    (Sanic starts none while the instance stops) clears a flag left by a lone restart."""
    shared = multiprocessing.get_context("spawn").RawValue("b", 0)
    settings = Settings.from_env({"JWT_SECRET": "x" * 48})
    first, second = Runtime.build(settings), Runtime.build(settings)
    for rt in (first, second):
        rt.instance_drain = shared
        rt.serving()
    assert not first.draining and not second.draining

    first.start_draining()
    assert first.draining and second.draining
    assert not asyncio.run(second.ready())

    second.serving()  # what a restarted worker does at start
    assert first.draining and not second.draining


def test_closing_one_worker_does_not_drain_its_siblings() -> None:
    shared = multiprocessing.get_context("spawn").RawValue("b", 0)
    settings = Settings.from_env({"JWT_SECRET": "x" * 48})
    first, second = Runtime.build(settings), Runtime.build(settings)
    first.instance_drain = second.instance_drain = shared
    asyncio.run(first.close())
    assert first.draining and not second.draining


class _Untouchable:
    """Sanic's shared worker-state proxy, which a signal handler must not use."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"worker_state.{name} used from the signal handler")

    def __getitem__(self, key: Any) -> Any:
        raise AssertionError("worker_state read from the signal handler")

    def __setitem__(self, key: Any, value: Any) -> None:
        raise AssertionError("worker_state written from the signal handler")


class _Child:
    """What a ``WorkerProcess`` asks of its ``multiprocessing`` process."""

    def __init__(self, proc: subprocess.Popen[bytes] | None) -> None:
        self.proc = proc
        self.pid = proc.pid if proc else 0

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _worker(proc: subprocess.Popen[bytes] | None) -> WorkerProcess:
    """Sanic's own ``WorkerProcess`` (its methods, the handler's code path), around a child
    of ours instead of one it spawned; its shared state is ``_Untouchable``."""
    worker: WorkerProcess = object.__new__(WorkerProcess)
    worker.name = f"Sanic-Server-{proc.pid if proc else 0}"
    worker.state = ProcessState.ACKED
    worker.worker_state = _Untouchable()  # type: ignore[assignment]
    worker._current_process = _Child(proc)  # type: ignore[assignment]
    return worker


class _Manager:
    """The parts of ``WorkerManager`` its handler uses."""

    shutdown = WorkerManager.shutdown

    def __init__(self, processes: list[WorkerProcess]) -> None:
        self.processes = processes
        self._shutting_down = False
        self.sent: list[Any] = []
        self.monitor_publisher = self

    def send(self, message: Any) -> None:
        self.sent.append(message)


def test_sigterm_handler_signals_the_workers_without_touching_shared_state() -> None:
    """Sanic's handler writes every worker's state to a manager proxy that the main thread
    may be using at that moment (the main process then died on crossed replies).  Ours
    sends SIGINT to each live worker and ends the monitor loop, and uses no proxy."""
    _shutdown.install()
    code = "import signal, time; signal.signal(signal.SIGINT, lambda *a: exit(7)); " \
           "print('ready', flush=True); time.sleep(30)"
    live = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert live.stdout is not None and live.stdout.readline() == b"ready\n"
        manager = _Manager([_worker(live), _worker(None)])
        WorkerManager.shutdown_signal(manager, signal.SIGTERM, None)  # type: ignore[arg-type]
        assert live.wait(10) == 7  # it got SIGINT, as from Sanic's own handler
        assert [p.state for p in manager.processes] == [ProcessState.TERMINATED,
                                                        ProcessState.ACKED]
        assert manager.sent == [None] and manager._shutting_down
    finally:
        live.kill()
        live.wait()


def test_the_manager_reads_its_workers_states_at_most_once_a_second(monkeypatch: Any) -> None:
    """Sanic's monitor loop syncs every worker's state through a proxy after each 0.1 s
    poll (a round trip per worker to the proxy's process, most of an idle instance's CPU
    with no connection).  Installed, the sync runs at most every ``SYNC_EVERY_S``."""
    from service import _manager

    calls: list[float] = []
    clock = [100.0]
    monkeypatch.setattr(_manager, "_sanic_sync", lambda manager: calls.append(clock[0]))
    monkeypatch.setattr(_manager.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(WorkerManager, "_sync_states", WorkerManager._sync_states)
    _manager.install()
    manager = _Manager([])
    for i in range(25):  # 2.5 s of the monitor loop's polls
        clock[0] = 100.0 + i * 0.1
        WorkerManager._sync_states(manager)  # type: ignore[arg-type]
    assert calls == [100.0, 101.0, 102.0], calls
