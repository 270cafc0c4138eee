"""The core stays transport-agnostic: it imports neither sanic nor redis."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_neither_sanic_nor_redis() -> None:
    code = (
        "import sys, service.core.hub, service.core.router, service.core.memory, "
        "service.core.session, service.core.contracts, service.core.ratelimit, service.protocol;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('sanic', 'redis'));"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
