"""The host CPU: its name, instruction-set identity, cores and memory.

Other modules call these through the module (``cpu.cpu_name()``), so a test patches them
here, once, for discovery and the bandwidth cache alike.
"""

from __future__ import annotations

import os
import platform

__all__ = ["cpu_cores", "cpu_identity", "cpu_memory", "cpu_name", "usable_cores"]


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
    """Logical cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return cpu_cores()


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
