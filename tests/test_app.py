"""The worker's process-level tuning (``service/app.py``)."""

from __future__ import annotations

import gc

from service.app import GC_THRESHOLDS, tune_gc


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
