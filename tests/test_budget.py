"""The disk budget of the cache folder, in a real Home Assistant."""

from datetime import timedelta
from pathlib import Path

import pytest
from pytest_homeassistant_custom_component.common import async_fire_time_changed

from custom_components.rockchip_llm.const import CONF_CACHE_BUDGET, DOMAIN
from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.core import Context, HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import (
    area_registry as ar,
    device_registry as dr,
    issue_registry as ir,
)
from homeassistant.util import dt as dt_util

from .conftest import EntryFactory

AGENT = "conversation.agent_0"


def disk_bytes(folder: Path) -> dict[str, int]:
    """The bytes each cache takes, by name."""
    sizes: dict[str, int] = {}
    for path in folder.iterdir():
        if path.suffix in (".bin", ".json"):
            sizes[path.stem] = sizes.get(path.stem, 0) + path.stat().st_size
    return sizes


async def list_caches(hass: HomeAssistant) -> dict:
    """Call list_caches."""
    return await hass.services.async_call(  # type: ignore[return-value]
        DOMAIN, "list_caches", {}, blocking=True, return_response=True
    )


async def test_budget_in_real_use(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    cache_dir: Path,
    device_registry: dr.DeviceRegistry,
    area_registry: ar.AreaRegistry,
) -> None:
    """Satellites' automatic caches make room for each other, least recently used
    first; a named cache that cannot fit is refused and nothing is lost."""
    hass.states.async_set("light.kitchen", "off", {"friendly_name": "Kitchen"})
    async_expose_entity(hass, conversation.DOMAIN, "light.kitchen", True)
    entry = await make_entry()
    folder = cache_dir / "Qwen3 Sim"
    system = (await hass.async_add_executor_job(disk_bytes, folder))["system"]
    # Room for the system cache and two automatic caches, not three.
    budget = 3.6 * system
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, CONF_CACHE_BUDGET: budget / 1_000_000}
    )
    assert await hass.config_entries.async_reload(entry.entry_id)
    agent = next(iter(entry.runtime_data.agents.values()))
    satellites = {}
    for name in ("Kitchen", "Hall", "Attic"):
        area = area_registry.async_create(name)
        device = device_registry.async_get_or_create(
            config_entry_id=entry.entry_id, identifiers={("test", name)}, name=name
        )
        device_registry.async_update_device(device.id, area_id=area.id)
        satellites[name] = device.id
    now = dt_util.utcnow()
    async_fire_time_changed(hass, now + timedelta(seconds=31))
    await hass.async_block_till_done(wait_background_tasks=True)

    async def ask(name: str, minutes: int) -> str | None:
        """Ask from a satellite, then let the debounced cache build run."""
        await conversation.async_converse(
            hass, "hello", None, Context(), agent_id=AGENT, device_id=satellites[name]
        )
        used = agent.session.recent[-1].cache
        async_fire_time_changed(hass, now + timedelta(minutes=minutes))
        await hass.async_block_till_done(wait_background_tasks=True)
        return used

    await ask("Kitchen", 1)
    await ask("Hall", 2)
    kitchen_cache = await ask("Kitchen", 3)  # the kitchen's cache is used again
    assert kitchen_cache is not None
    assert kitchen_cache.startswith("auto_")
    await ask("Attic", 4)  # no room for a third: the hall's goes, not the kitchen's
    names = set(await hass.async_add_executor_job(disk_bytes, folder))
    assert len(names) == 3
    assert {"system", kitchen_cache} < names
    assert await ask("Kitchen", 5) == kitchen_cache
    assert await ask("Hall", 6) == "system"  # evicted: the hall starts over

    listed = await list_caches(hass)
    [cache_dir_report] = listed["cache_dirs"]
    sizes = await hass.async_add_executor_job(disk_bytes, folder)
    assert cache_dir_report["path"] == str(cache_dir)
    assert cache_dir_report["budget_bytes"] == int(budget)
    assert cache_dir_report["used_bytes"] == sum(sizes.values()) <= int(budget)
    assert cache_dir_report["free_bytes"] > 0
    assert {c["name"]: c["disk_bytes"] for c in listed["caches"]} == sizes

    # A named cache four times the system prompt's size cannot fit, even without
    # automatic caches: refused, nothing evicted, a repair says what to do.
    with pytest.raises(HomeAssistantError) as err:
        await hass.services.async_call(
            DOMAIN,
            "create_cache",
            {
                "model": "Qwen3 Sim",
                "name": "big",
                "prompt": agent.system_cache.prefix.prompt * 4,
            },  # type: ignore[union-attr]
            blocking=True,
        )
    assert err.value.translation_key == "cache_budget_exceeded"
    assert str(err.value).startswith(
        'The prompt cache "big" of model Qwen3 Sim would not fit the cache budget: '
        "it needs about "
    )
    assert await hass.async_add_executor_job(disk_bytes, folder) == sizes
    issue = ir.async_get(hass).async_get_issue(DOMAIN, f"cache_dir_{entry.entry_id}")
    assert issue is not None
    assert issue.translation_key == "cache_budget_exceeded"
    # A smaller named cache fits once an automatic cache makes room.
    await hass.services.async_call(
        DOMAIN,
        "create_cache",
        {
            "model": "Qwen3 Sim",
            "name": "half",
            "prompt": agent.system_cache.prefix.prompt[:2000],
        },  # type: ignore[union-attr]
        blocking=True,
    )
    after = await hass.async_add_executor_job(disk_bytes, folder)
    assert "half" in after
    assert "system" in after
    assert sum(after.values()) <= int(budget)
    assert (
        ir.async_get(hass).async_get_issue(DOMAIN, f"cache_dir_{entry.entry_id}")
        is None
    )


async def test_budget_repair_withdrawn_once_there_is_room(
    hass: HomeAssistant, make_entry: EntryFactory, cache_dir: Path
) -> None:
    """The budget's repair stays while the refused cache still would not fit.

    Deleting a named cache makes room: the next look (list_caches) withdraws it,
    without a write or a reload.
    """
    entry = await make_entry()
    folder = cache_dir / "Qwen3 Sim"
    system = (await hass.async_add_executor_job(disk_bytes, folder))["system"]
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, CONF_CACHE_BUDGET: 3.3 * system / 1_000_000}
    )
    assert await hass.config_entries.async_reload(entry.entry_id)
    agent = next(iter(entry.runtime_data.agents.values()))
    prompt = agent.system_cache.prefix.prompt  # type: ignore[union-attr]
    issue_id = f"cache_dir_{entry.entry_id}"

    async def create(name: str, text: str) -> None:
        await hass.services.async_call(
            DOMAIN,
            "create_cache",
            {"model": "Qwen3 Sim", "name": name, "prompt": text},
            blocking=True,
        )

    await create("notes", prompt)
    with pytest.raises(HomeAssistantError) as err:
        await create("big", prompt * 2)
    assert err.value.translation_key == "cache_budget_exceeded"
    assert ir.async_get(hass).async_get_issue(DOMAIN, issue_id) is not None
    await list_caches(hass)
    assert ir.async_get(hass).async_get_issue(DOMAIN, issue_id) is not None
    await hass.services.async_call(
        DOMAIN, "delete_cache", {"model": "Qwen3 Sim", "name": "notes"}, blocking=True
    )
    await list_caches(hass)
    assert ir.async_get(hass).async_get_issue(DOMAIN, issue_id) is None
    await create("big", prompt * 2)
