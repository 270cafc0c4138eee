"""Prometheus multiprocess mode must be chosen before ``prometheus_client`` is imported
anywhere, in the main process, before workers exist (they inherit the environment).
``prepare()`` is the first thing ``service/__init__`` does."""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"


def _is_worker() -> bool:
    return bool(os.environ.get("SANIC_WORKER_NAME") or os.environ.get("SANIC_WORKER_PROCESS"))


def prepare() -> str:
    """Return the metrics directory, creating a private one when none is configured, and
    emptying it when this is the main process (stale files would add dead workers' counts)."""
    path = os.environ.get(ENV)
    if _is_worker() and path:
        return path
    if not path:
        path = tempfile.mkdtemp(prefix="signaling-metrics-")
        os.environ[ENV] = path
        atexit.register(shutil.rmtree, path, True)
        return path
    os.makedirs(path, exist_ok=True)
    for f in glob.glob(os.path.join(path, "*.db")):
        # another process that inherited the directory may be emptying it too (two tools
        # started side by side): a file already gone is what this wanted
        with contextlib.suppress(FileNotFoundError):
            os.remove(f)
    return path
