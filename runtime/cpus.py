"""How many CPUs this process may use: its affinity and a container's CPU quota.

os.cpu_count() and ONNX Runtime's default thread count see every core of the machine. A Kubernetes pod limited to
2 CPUs on a 64-core node (cgroup v2 `cpu.max` "200000 100000", or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`)
would then run 64 threads and be throttled every period: the runtime's backends take this count instead when no
thread count is given. Inside a container the cgroup filesystem at /sys/fs/cgroup is the container's own.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def affinity_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup's quota allows (1.5 for 150 ms per 100 ms), or None without a quota or where unreadable."""
    try:
        fields = (root / "cpu.max").read_text().split()  # cgroup v2: "max 100000" or "QUOTA PERIOD"
        if len(fields) == 2 and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, ZeroDivisionError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct"):  # cgroup v1
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            return quota / period if quota > 0 and period > 0 else None
        except (OSError, ValueError):
            continue
    return None


def quota_threads(root: Path = CGROUP_ROOT) -> int | None:
    """The thread count a backend should use when none is given: the quota's CPUs (rounded up) where a quota caps
    this process below its cores; None otherwise (the engine's own default, every core)."""
    quota = cpu_quota(root)
    if quota is None or quota <= 0:
        return None
    cpus = max(1, math.ceil(quota - 1e-9))
    return cpus if cpus < affinity_cpus() else None
