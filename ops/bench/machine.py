"""CPU accounting for benchmarks: a process's CPU time and the hypervisor's steal time.

On a virtual machine the host may stop a virtual core for milliseconds at a time to run
someone else. Real-time figures (pacing, latency) taken while that happens measure the
host, not the code, so the benchmarks print the share of time stolen beside them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def runqueue_wait_seconds(pid: int) -> float:
    """Seconds ``pid``'s main thread has waited, runnable, for a CPU (another process on its
    core, or the hypervisor); 0 where the kernel does not say."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def steal_seconds(core: int | None = None) -> float:
    """Seconds stolen so far from ``core`` (all cores together when None); 0 where unknown."""
    prefix = "cpu " if core is None else f"cpu{core} "
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(prefix):
            fields = line.split()
            return int(fields[8]) / CLOCK_TICKS if len(fields) > 8 else 0.0
    return 0.0


class StealMeter:
    """The share of the machine's core time stolen between ``start()`` and ``share()``."""

    def __init__(self, core: int | None = None) -> None:
        self.core = core
        self.cores = 1 if core is not None else (os.cpu_count() or 1)
        self._steal = 0.0
        self._wall = 0.0

    def start(self) -> StealMeter:
        self._steal, self._wall = steal_seconds(self.core), time.monotonic()
        return self

    def share(self) -> float:
        elapsed = max(1e-9, time.monotonic() - self._wall)
        return (steal_seconds(self.core) - self._steal) / elapsed / self.cores
