"""Facts about the board: NPU driver version and SoC (no Home Assistant imports).

Reading them blocks (kernel files): call these off the event loop.
"""

from pathlib import Path
import re
from typing import Any, Final

NPU_DRIVER_VERSION_PATH: Final = Path("/sys/kernel/debug/rknpu/version")
NPU_LOAD_PATH: Final = Path("/sys/kernel/debug/rknpu/load")
DEVICE_TREE_COMPATIBLE_PATH: Final = Path("/proc/device-tree/compatible")
_MAX_HOST_FILE_BYTES: Final = 4096

MIN_NPU_DRIVER: Final = (0, 9, 8)
"""The RKNPU driver version RKLLM runtimes >= 1.1 need."""

_VERSION: Final = re.compile(r"(\d+)\.(\d+)\.(\d+)")
_PERCENT: Final = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def _read_host_file(path: Path) -> bytes | None:
    """Return the head of a kernel file, None when it is absent or unreadable."""
    try:
        with path.open("rb") as file:
            return file.read(_MAX_HOST_FILE_BYTES)
    except OSError:
        return None


def read_host_info() -> dict[str, Any]:
    """Read the NPU driver version and the SoC from the kernel (blocking).

    The driver version lives in debugfs, which is often not mounted or readable
    inside containers; each value is None when it cannot be read.
    """
    raw_version = _read_host_file(NPU_DRIVER_VERSION_PATH)
    version = (
        raw_version.decode("utf-8", "replace").strip() or None
        if raw_version is not None
        else None
    )
    raw_compatible = _read_host_file(DEVICE_TREE_COMPATIBLE_PATH)
    compatible = (
        [
            part.decode("utf-8", "replace")
            for part in raw_compatible.split(b"\0")
            if part.strip()
        ]
        if raw_compatible is not None
        else None
    )
    soc = next(
        (item for item in compatible or () if item.startswith("rockchip,")),
        None,
    )
    return {
        "npu_driver_version": version,
        "device_tree_compatible": compatible,
        "soc": soc.removeprefix("rockchip,") if soc else None,
    }


def npu_driver_too_old(version: str | None) -> bool:
    """Whether a driver version text (e.g. "RKNPU driver: v0.9.6") is below 0.9.8."""
    match = _VERSION.search(version or "")
    if match is None:
        return False
    return tuple(int(part) for part in match.groups()) < MIN_NPU_DRIVER


def read_npu_load(path: Path = NPU_LOAD_PATH) -> float | None:
    """Return the mean load of the NPU cores in percent, None when not exposed (blocking).

    The kernel reports one percentage per core ("NPU load:  Core0: 12%, Core1:  0%,
    Core2:  0%," on RK3588; a single value on one-core NPUs).
    """
    raw = _read_host_file(path)
    if raw is None:
        return None
    loads = [float(value) for value in _PERCENT.findall(raw.decode("utf-8", "replace"))]
    return round(sum(loads) / len(loads), 1) if loads else None
