from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support import Conns


@pytest.fixture
async def conns() -> AsyncIterator[Conns]:
    """Clients opened by a test, all closed at its end."""
    c = Conns()
    try:
        yield c
    finally:
        await c.close_all()
