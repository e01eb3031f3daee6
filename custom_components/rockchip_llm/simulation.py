"""Telling Rockchip's runtime from the development simulator (no Home Assistant imports).

The simulator in tests/rkllm_sim exports the runtime's functions plus a few of its
own; one of them marks a library as simulated, so everything the user sees can say so.
"""

import ctypes
import mmap
from pathlib import Path
from typing import Final

SIMULATOR_ENV: Final = "ROCKCHIP_LLM_SIMULATOR"
"""Development fallback: path of the simulator library, used when no runtime exists."""
SIMULATOR_SYMBOL: Final = "rkllm_sim_counter"


def library_is_simulated(cdll: ctypes.CDLL) -> bool:
    """Whether a loaded runtime library is the simulator."""
    return hasattr(cdll, SIMULATOR_SYMBOL)


def file_is_simulator(path: Path) -> bool:
    """Whether a library file is the simulator, without loading it (blocking)."""
    try:
        with (
            path.open("rb") as file,
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            return data.find(SIMULATOR_SYMBOL.encode()) >= 0
    except OSError, ValueError:
        return False


def simulated_label(name: str) -> str:
    """Return name marked as simulated, unless it already says so."""
    return name if "simulated" in name.lower() else f"{name} (simulated)"
