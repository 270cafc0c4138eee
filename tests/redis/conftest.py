from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.backends.redis_client import make_client

pytestmark = pytest.mark.redis


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    client = make_client(redis_url, timeout=2.0)
    try:
        yield client
    finally:
        await client.aclose()
