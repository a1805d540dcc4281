"""The host's available memory, as the kernel reports it."""
from __future__ import annotations


def meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        return None
    return info.get("MemAvailable")
