from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support import STARTED, Conns

LOG_TAIL_LINES = 40


@pytest.fixture
async def conns() -> AsyncIterator[Conns]:
    """Clients opened by a test, all closed at its end."""
    c = Conns()
    try:
        yield c
    finally:
        await c.close_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed end-to-end test reports the log tail of every server written to while it
    ran (their warnings are what a CI run leaves to read).  Server logs carry no client
    address, token or payload."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for server in STARTED:
        with contextlib.suppress(OSError):
            if server.log_path.stat().st_mtime < call.start:
                continue  # untouched during this test
            tail = "\n".join(server.log().splitlines()[-LOG_TAIL_LINES:])
            report.sections.append((f"server :{server.port} log (tail)", tail))
