"""Peak resident memory of a region of code on Linux, for the CPU benchmarks.

The kernel's high-water mark (VmHWM) is reset by writing "5" to /proc/self/clear_refs; the peak of a
region is then VmHWM - VmRSS at its start. Run each variant in a fresh process so memory freed
(but kept by the allocator) in one variant cannot hide in the next one's number.
"""
from __future__ import annotations


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status (this benchmark needs Linux)")


def reset_peak() -> int:
    """Reset the high-water mark; return the current RSS in KiB (the region's baseline)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = status_kib("VmRSS")
    if status_kib("VmHWM") > baseline + 1024:
        raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs; the peak would be wrong")
    return baseline


def peak_since_mib(baseline_kib: int) -> float:
    return (status_kib("VmHWM") - baseline_kib) / 1024
