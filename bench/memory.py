"""Resident memory of this process, for the benchmarks that measure it: now, at its peak, and the peak restarted."""

from __future__ import annotations

import sys
from pathlib import Path


def status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the peak since start or the last reset);
    None where there is no such file (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_kib() -> int:
    """The peak resident set: VmHWM, else the rusage maximum (which a reset does not restart)."""
    hwm = status_kib("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS


def reset_peak() -> bool:
    """Restart VmHWM from the current resident set (Linux >= 4.0: clear_refs 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return status_kib("VmHWM") is not None
    except OSError:
        return False
