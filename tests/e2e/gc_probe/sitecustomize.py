"""A probe for tests and benchmarks, imported by every Python process started with this
directory on PYTHONPATH (``site`` imports ``sitecustomize``).  SIGUSR2 writes
``$GC_PROBE_DIR/<pid>.json``: the unreachable objects (``garbage``) and the live ones
(``live``) by type, of the types a connection is made of; ``tracked``, every object the
cyclic GC tracks; ``collect_ms``, how long a full collection took.  With ``GC_PROBE_OFF=1``
the cyclic GC is off, so whatever only a collection would free stays unreachable until
the probe.  A marker cycle made on each signal proves the probe sees cycles."""

from __future__ import annotations

import collections
import gc
import json
import os
import signal
import time
from typing import Any

if os.environ.get("GC_PROBE_OFF") == "1":
    gc.disable()

_OURS = ("service.", "sanic.server.", "sanic.http.", "sanic.request.", "sitecustomize.")


class Marker:
    """One reference cycle made per probe: the probe must report exactly one."""

    def __init__(self) -> None:
        self.me = self


def _by_type(objects: list[Any]) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for o in objects:
        name = f"{type(o).__module__}.{type(o).__qualname__}"
        if name.startswith(_OURS):
            counts[name] += 1
    return dict(counts)


def _probe(signum: int, frame: Any) -> None:
    Marker()
    tracked = len(gc.get_objects())
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what a collection finds, to count it
    started = time.perf_counter()
    gc.collect()
    took = time.perf_counter() - started
    gc.set_debug(0)
    garbage = _by_type(gc.garbage)
    unreachable = len(gc.garbage)
    gc.garbage.clear()
    gc.collect()  # now free it
    report = {"garbage": garbage, "live": _by_type(gc.get_objects()), "tracked": tracked,
              "unreachable": unreachable, "collect_ms": round(took * 1000, 1)}
    path = os.path.join(os.environ["GC_PROBE_DIR"], f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)


signal.signal(signal.SIGUSR2, _probe)
