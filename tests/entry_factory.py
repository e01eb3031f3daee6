"""The runtime config entry with its agents, as the tests and scripts/benchmark build it."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_homeassistant_custom_component.common import MockConfigEntry  # type: ignore[import-untyped]

from custom_components.rockchip_llm.const import (
    CONF_CACHE_DIR,
    CONF_LIBRARY_PATH,
    CONF_MODEL,
    CONF_MODELS_DIR,
    DOMAIN,
)
from homeassistant.config_entries import ConfigSubentryData
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.helpers import llm


def runtime_entry(
    *,
    library: Path,
    models_dir: Path,
    cache_dir: Path,
    model: str,
    agents: Sequence[Mapping[str, Any]] = ({},),
    ai_tasks: Sequence[Mapping[str, Any]] = (),
    title: str = "Rockchip LLM",
) -> MockConfigEntry:
    """Return a runtime entry, not yet added to Home Assistant.

    One conversation agent per options mapping ("Agent <index>", on the Assist API)
    and one AI task per ai_tasks mapping ("Task <index>"), all on model unless their
    options say otherwise.
    """
    conversation = [
        ConfigSubentryData(
            data={
                CONF_MODEL: model,
                CONF_LLM_HASS_API: [llm.LLM_API_ASSIST],
                **options,
            },
            subentry_type="conversation",
            title=f"Agent {index}",
            unique_id=None,
        )
        for index, options in enumerate(agents)
    ]
    tasks = [
        ConfigSubentryData(
            data={CONF_MODEL: model, **options},
            subentry_type="ai_task_data",
            title=f"Task {index}",
            unique_id=None,
        )
        for index, options in enumerate(ai_tasks)
    ]
    return MockConfigEntry(
        domain=DOMAIN,
        title=title,
        data={
            CONF_LIBRARY_PATH: str(library),
            CONF_MODELS_DIR: str(models_dir),
            CONF_CACHE_DIR: str(cache_dir),
        },
        subentries_data=conversation + tasks,
    )
