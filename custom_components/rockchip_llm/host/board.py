"""Facts about the board: NPU driver version and SoC (no Home Assistant imports).

Reading them blocks (kernel files): call these off the event loop.
"""

import os
from pathlib import Path
import re
import socket
from typing import Any, Final

NPU_DEBUGFS_ENV: Final = "ROCKCHIP_LLM_NPU_DEBUGFS"
"""Where the RKNPU driver's debug files are, if not /sys/kernel/debug/rknpu (a
container that mounts the host's debugfs elsewhere)."""
DEVICE_TREE_ENV: Final = "ROCKCHIP_LLM_DEVICE_TREE"
"""Where the device tree is, if not /proc/device-tree."""
_MAX_HOST_FILE_BYTES: Final = 4096


def _npu_debugfs() -> Path:
    return Path(os.environ.get(NPU_DEBUGFS_ENV) or "/sys/kernel/debug/rknpu")


def npu_driver_version_path() -> Path:
    """Return the kernel file with the RKNPU driver's version."""
    return _npu_debugfs() / "version"


def npu_load_path() -> Path:
    """Return the kernel file with the NPU cores' load."""
    return _npu_debugfs() / "load"


def device_tree_compatible_path() -> Path:
    """Return the device tree's list of compatible boards and SoCs."""
    return Path(os.environ.get(DEVICE_TREE_ENV) or "/proc/device-tree") / "compatible"


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
    raw_version = _read_host_file(npu_driver_version_path())
    version = (
        raw_version.decode("utf-8", "replace").strip() or None
        if raw_version is not None
        else None
    )
    raw_compatible = _read_host_file(device_tree_compatible_path())
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


def hostname() -> str:
    """Return the board's name on the network."""
    return socket.gethostname()


def board_name(host: str, soc: str | None) -> str:
    """Name the board as people know it: its hostname, with the SoC when known."""
    return f"{host} ({soc})" if soc else host


def npu_driver_too_old(version: str | None) -> bool:
    """Whether a driver version text (e.g. "RKNPU driver: v0.9.6") is below 0.9.8."""
    match = _VERSION.search(version or "")
    if match is None:
        return False
    return tuple(int(part) for part in match.groups()) < MIN_NPU_DRIVER


def read_npu_load(path: Path | None = None) -> float | None:
    """Return the mean load of the NPU cores in percent, None when not exposed (blocking).

    The kernel reports one percentage per core ("NPU load:  Core0: 12%, Core1:  0%,
    Core2:  0%," on RK3588; a single value on one-core NPUs).
    """
    raw = _read_host_file(path or npu_load_path())
    if raw is None:
        return None
    loads = [float(value) for value in _PERCENT.findall(raw.decode("utf-8", "replace"))]
    return round(sum(loads) / len(loads), 1) if loads else None
