"""Groups of Assist tools a person understands, to offer a model only some of them.

HA offers the tools its exposed devices need; an agent may offer fewer (its
option "tool_groups"), and an agent whose prefix does not fit its context leaves
groups out in LEAVE_OUT_ORDER. No Home Assistant imports.
"""

from collections.abc import Collection, Iterable
from enum import StrEnum
from typing import Final


class ToolGroup(StrEnum):
    """A group of tools, named for what they do."""

    LIGHTS_SWITCHES = "lights_switches"
    CLIMATE = "climate"
    COVERS = "covers"
    MEDIA = "media"
    VACUUMS = "vacuums"
    TIMERS = "timers"
    LISTS = "lists"
    CONTEXT = "context"
    OTHER = "other"


_GROUP_OF: Final[dict[str, ToolGroup]] = {
    **dict.fromkeys(
        ("HassTurnOn", "HassTurnOff", "HassToggle", "HassLightSet"),
        ToolGroup.LIGHTS_SWITCHES,
    ),
    **dict.fromkeys(
        (
            "HassClimateSetTemperature",
            "HassClimateGetTemperature",
            "HassHumidifierSetpoint",
            "HassHumidifierMode",
            "HassFanSetSpeed",
            "HassWaterHeaterSetTemperature",
        ),
        ToolGroup.CLIMATE,
    ),
    **dict.fromkeys(
        ("HassSetPosition", "HassStopMoving", "HassValveSetPosition"), ToolGroup.COVERS
    ),
    **dict.fromkeys(
        (
            "HassMediaPause",
            "HassMediaUnpause",
            "HassMediaNext",
            "HassMediaPrevious",
            "HassSetVolume",
            "HassSetVolumeRelative",
            "HassMediaPlayerMute",
            "HassMediaPlayerUnmute",
            "HassMediaSearchAndPlay",
        ),
        ToolGroup.MEDIA,
    ),
    **dict.fromkeys(
        (
            "HassVacuumStart",
            "HassVacuumReturnToBase",
            "HassVacuumCleanArea",
            "HassLawnMowerStartMowing",
            "HassLawnMowerDock",
        ),
        ToolGroup.VACUUMS,
    ),
    **dict.fromkeys(
        (
            "HassStartTimer",
            "HassCancelTimer",
            "HassCancelAllTimers",
            "HassIncreaseTimer",
            "HassDecreaseTimer",
            "HassPauseTimer",
            "HassUnpauseTimer",
            "HassTimerStatus",
        ),
        ToolGroup.TIMERS,
    ),
    **dict.fromkeys(
        (
            "HassShoppingListAddItem",
            "HassShoppingListCompleteItem",
            "HassListAddItem",
            "HassListCompleteItem",
            "todo_get_items",
        ),
        ToolGroup.LISTS,
    ),
    **dict.fromkeys(
        (
            "GetLiveContext",
            "GetDateTime",
            "HassGetState",
            "HassGetWeather",
            "HassGetCurrentDate",
            "HassGetCurrentTime",
        ),
        ToolGroup.CONTEXT,
    ),
}

LEAVE_OUT_ORDER: Final = (
    ToolGroup.OTHER,
    ToolGroup.LISTS,
    ToolGroup.TIMERS,
    ToolGroup.VACUUMS,
    ToolGroup.MEDIA,
    ToolGroup.COVERS,
    ToolGroup.CLIMATE,
)
"""Groups an agent leaves out, first to last, when its prefix does not fit.

Each trim step leaves out one more thing: first the static device list, then
these groups in this order.

Needed least first: tools for devices are kept longest, lights and switches and
the context tools (GetLiveContext finds devices once their list is left out) never.
"""


def tool_group(tool_name: str) -> ToolGroup:
    """Return the group of a tool; HA's namespace ("intent__") is ignored."""
    return _GROUP_OF.get(tool_name.rsplit("__", 1)[-1], ToolGroup.OTHER)


def offered(tool_names: Iterable[str], groups: Collection[str] | None) -> list[str]:
    """Return the tools of names that the groups offer (None: every group)."""
    return [name for name in tool_names if groups is None or tool_group(name) in groups]


MAX_TRIM: Final = 1 + len(LEAVE_OUT_ORDER)


def trim_device_list(trim: int) -> bool:
    """Whether a prefix trimmed trim steps keeps the static device list."""
    return trim == 0


def trimmed_groups(trim: int) -> tuple[ToolGroup, ...]:
    """Return the groups a prefix trimmed trim steps leaves out (after the devices)."""
    return LEAVE_OUT_ORDER[: max(0, trim - 1)]
