"""The per-message metrics are summed in memory and written in one go (``metrics.flush``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import metrics


def _latency() -> dict[str, float]:
    [family] = metrics.LATENCY.collect()
    return {
        f"{s.name}{s.labels.get('le', '')}": s.value for s in family.samples
        if s.name.endswith(("_bucket", "_count", "_sum"))
    }


async def test_batched_latencies_land_as_observe_would_put_them() -> None:
    metrics.flush()
    before = _latency()
    stats = metrics.PromStats()
    for value in (0.0005, 0.0007, 0.003, 100.0):  # a bound is inclusive (le)
        stats.delivered(value)
    assert _latency() == before  # nothing written per message
    metrics.flush()
    after = _latency()
    delta = {k: round(after[k] - before[k], 9) for k in after}
    name = "signaling_delivery_latency_seconds"
    assert delta[f"{name}_bucket0.0005"] == 1
    assert delta[f"{name}_bucket0.001"] == 2
    assert delta[f"{name}_bucket0.005"] == 3
    assert delta[f"{name}_bucket2.5"] == 3
    assert delta[f"{name}_bucket+Inf"] == 4
    assert delta[f"{name}_count"] == 4
    assert delta[f"{name}_sum"] == round(0.0005 + 0.0007 + 0.003 + 100.0, 9)
    metrics.flush()
    assert _latency() == after  # flushed once


def test_emptying_the_metrics_dir_tolerates_a_file_another_process_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two main processes that inherited one directory (tools started side by side) both
    empty it at import: a file the other one removed first is not an error."""
    from service import _promdir

    kept = tmp_path / "counter_1.db"
    kept.write_bytes(b"stale")
    gone = tmp_path / "histogram_2.db"  # listed, then removed by the other process
    monkeypatch.setenv(_promdir.ENV, str(tmp_path))
    monkeypatch.delenv("SANIC_WORKER_NAME", raising=False)
    monkeypatch.delenv("SANIC_WORKER_PROCESS", raising=False)
    monkeypatch.setattr(_promdir.glob, "glob", lambda pattern: [str(gone), str(kept)])
    assert _promdir.prepare() == str(tmp_path)
    assert not kept.exists()
