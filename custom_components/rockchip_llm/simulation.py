"""The development simulator in what the user sees (no Home Assistant imports).

Whether a library is the simulator is read from its file
(:func:`~.host.rkllm.library.file_is_simulator`); everything the user sees says so.
"""

from typing import Final

SIMULATOR_ENV: Final = "ROCKCHIP_LLM_SIMULATOR"
"""Development fallback: path of the simulator library, used when no runtime exists."""


def simulated_label(name: str) -> str:
    """Return name marked as simulated, unless it already says so."""
    return name if "simulated" in name.lower() else f"{name} (simulated)"
