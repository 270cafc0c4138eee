"""Process accounting from ``/proc``: CPU seconds (utime + stime) and resident memory
(``VmRSS``) of a process and all its descendants, and CPU pinning helpers."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterable, Iterator

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for every process visible in /proc."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: split after the last ")"
        rest = data[data.rfind(b")") + 2 :].split()
        out.setdefault(int(rest[1]), []).append(int(name))
    return out


def tree(roots: Iterable[int]) -> list[int]:
    """The given pids and all their (live) descendants."""
    kids = _children_map()
    seen: list[int] = []
    stack = [p for p in roots if os.path.exists(f"/proc/{p}")]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.append(pid)
        stack.extend(kids.get(pid, ()))
    return seen


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0.0
    rest = data[data.rfind(b")") + 2 :].split()
    # fields 14 and 15 of stat(5); rest starts at field 3
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def io_calls(pid: int) -> tuple[int, int]:
    """(syscr, syscw) of /proc/<pid>/io: the read-type and write-type system calls
    (read/readv/pread, write/writev/pwrite — what libuv, so uvloop and Node, use on sockets;
    recv/send-family calls are not counted).  (0, 0) when unreadable."""
    r = w = 0
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("syscr:"):
                    r = int(line.split()[1])
                elif line.startswith("syscw:"):
                    w = int(line.split()[1])
    except OSError:
        pass
    return r, w


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Group:
    """A set of root processes (e.g. the server's main processes and redis-server) whose
    whole trees are accounted together.  CPU is per-pid so a worker that exits between two
    samples does not make the delta negative: each sample remembers every pid seen."""

    def __init__(self, roots: Iterable[int]) -> None:
        self.roots = list(roots)

    def pids(self) -> list[int]:
        return tree(self.roots)

    def cpu(self) -> dict[int, float]:
        return {pid: cpu_seconds(pid) for pid in self.pids()}

    def rss_kb(self) -> int:
        return sum(rss_kb(pid) for pid in self.pids())

    def io(self) -> dict[int, tuple[int, int]]:
        return {pid: io_calls(pid) for pid in self.pids()}

    @staticmethod
    def io_delta(
        before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
    ) -> tuple[int, int]:
        """Read-type and write-type system calls made between two samples."""
        r = sum(v[0] - before.get(pid, (0, 0))[0] for pid, v in after.items())
        w = sum(v[1] - before.get(pid, (0, 0))[1] for pid, v in after.items())
        return r, w

    def rss_by_pid(self) -> dict[int, int]:
        return {pid: rss_kb(pid) for pid in self.pids()}

    @staticmethod
    def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(v - before.get(pid, 0.0) for pid, v in after.items())


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Run the block with this process pinned to ``cpus`` (None: unchanged), so that the
    processes it starts inherit the mask; the previous mask is restored afterwards."""
    if not cpus:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def pin_tree(roots: Iterable[int], cpus: set[int]) -> None:
    """Pin every thread of every process of the trees (for processes started elsewhere)."""
    for pid in tree(roots):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


def core_speed_ns(cpus: set[int] | None, steps: int = 100_000, rounds: int = 5) -> float:
    """Nanoseconds per step of a fixed interpreter loop run on ``cpus`` (the median of
    ``rounds``, ~50 ms in all): how fast that core ran at that moment.  A virtual machine's
    core is shared with other tenants (its hyperthread twin, the host's other guests); on
    the benchmark's machine this figure swung nearly x2 within minutes (68-134 ns a step),
    and the tail latency of a run at a fixed rate followed it, not the code."""
    times: list[float] = []
    with pinned(cpus):
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            _spin(steps)
            times.append((time.perf_counter_ns() - t0) / steps)
    return round(statistics.median(times), 1)


def _spin(n: int) -> int:
    x = 0
    for i in range(n):
        x += i * 3 ^ 5
    return x
