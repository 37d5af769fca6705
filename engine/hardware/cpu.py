"""The host CPU: its name, instruction-set identity, cores and memory.

Other modules call these through the module (``cpu.cpu_name()``), so a test patches them
here, once, for discovery and the bandwidth cache alike.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cgroup_cpu_quota", "cpu_cores", "cpu_identity", "cpu_memory", "cpu_name",
           "usable_cores"]


def _cpuinfo_field(name: str) -> str | None:
    """The first non-empty ``name`` field of /proc/cpuinfo, or None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == name and value.strip():
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says, else ``"cpu"``."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "cpu"


def cpu_identity() -> str:
    """The CPU's model name and instruction-set flags: what code built for this CPU depends on."""
    return f"{cpu_name()}|{_cpuinfo_field('flags') or platform.machine()}"


def cpu_cores() -> int:
    """Logical cores of the machine (``os.cpu_count()``, at least 1)."""
    return os.cpu_count() or 1


def usable_cores() -> int:
    """Logical cores this process may run on: its affinity mask where the OS has one,
    capped by a cgroup v2 CPU quota (``cpu.max``, a container's CPU limit) when set."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        cores = cpu_cores()
    quota = cgroup_cpu_quota()
    return max(1, min(cores, quota)) if quota is not None else cores


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path | None = None) -> int | None:
    """Whole CPUs the process's cgroup (v2) may use (``cpu.max`` quota / period, rounded
    up), or None where there is no limit or no cgroup v2 to ask."""
    base = root or CGROUP_ROOT
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        relative = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
        quota, period = (base / relative.lstrip("/") / "cpu.max").read_text().split()[:2]
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def cpu_memory() -> tuple[int, int]:
    """(total, available) host memory in bytes; (0, 0) where neither psutil nor sysconf says."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except Exception:  # psutil missing or unusable: fall back to sysconf
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total = os.sysconf("SC_PHYS_PAGES") * page
            available = os.sysconf("SC_AVPHYS_PAGES") * page
            return int(total), int(available)
        except (ValueError, OSError, AttributeError):
            return 0, 0
