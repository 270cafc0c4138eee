"""The worker's process-level tuning (``service/app.py``)."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing

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
