"""The system prefix per home size, in real Qwen3 tokens: what fits which context.

Three homes: one template light; Home Assistant's own ``demo:`` integration; a
generated home of 150 entities over 12 areas. For each, HA's prefix as it hands
it over (the YAML device list, the tools' OpenAPI schemas) and the compact one
the runtime receives, counted by Qwen3's tokenizer and chat template and by the
simulator; cache size and build time at RK3588's published rates.
"""

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
import json
from pathlib import Path
import tempfile
from typing import Any

from custom_components.rockchip_llm.agent_prefix import (
    async_render_prefix,
    request_chat_log,
    split_volatile,
    tool_specs,
)
from custom_components.rockchip_llm.const import CONF_PROMPT, DEFAULT_PROMPT_FILE
from custom_components.rockchip_llm.run_planner import SystemPrefix
from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import HomeAssistant
from homeassistant.helpers import area_registry as ar, entity_registry as er, llm
from homeassistant.setup import async_setup_component
from tests.sim_template import sim_system_block

from .harness import async_setup_assist, home_assistant
from .qwen3 import Qwen3
from .scenario import QWEN3_06B_KV_BYTES_PER_TOKEN, RK3588_DECODE_MS, RK3588_PREFILL_MS

RK3588_QWEN3_4B_PREFILL_MS = 16.0
"""Published RK3588 prefill rate of Qwen3-4B w8a8 (about 10 times the 0.6B's)."""
QUESTION_TOKENS = 40
"""A voice question with its template and time line, prefilled after the cache."""
AREAS = (
    "Kitchen", "Living Room", "Dining Room", "Bedroom", "Kids Room", "Guest Room",
    "Bathroom", "Office", "Hallway", "Garage", "Garden", "Basement",
)  # fmt: skip
KINDS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("light", "Light", "off", {}),
    ("light", "Lamp", "on", {}),
    ("switch", "Socket", "off", {}),
    ("sensor", "Temperature", "21.0", {"device_class": "temperature"}),
    ("sensor", "Humidity", "48", {"device_class": "humidity"}),
    ("binary_sensor", "Window", "off", {"device_class": "window"}),
    ("cover", "Blinds", "open", {}),
    ("media_player", "Speaker", "idle", {}),
    ("climate", "Thermostat", "heat", {}),
    ("fan", "Fan", "off", {}),
    ("lock", "Door Lock", "locked", {}),
    ("binary_sensor", "Motion", "off", {"device_class": "motion"}),
    ("sensor", "Power", "12", {"device_class": "power"}),
)


def _add(
    hass: HomeAssistant, entity_id: str, name: str, state: str, attrs: dict[str, Any]
) -> str:
    domain, object_id = entity_id.split(".", 1)
    entry = er.async_get(hass).async_get_or_create(
        domain, "bench", object_id, suggested_object_id=object_id, original_name=name
    )
    hass.states.async_set(entry.entity_id, state, {"friendly_name": name, **attrs})
    async_expose_entity(hass, conversation.DOMAIN, entry.entity_id, True)
    return entry.entity_id


async def async_one_light(hass: HomeAssistant) -> None:
    """One light in a kitchen."""
    _add(hass, "light.kitchen_light", "Kitchen Light", "off", {})


async def async_demo(hass: HomeAssistant) -> None:
    """Home Assistant's demo integration, everything it exposes by default."""
    assert await async_setup_component(hass, "demo", {"demo": {}})
    await hass.async_block_till_done()


async def async_generated(hass: HomeAssistant, entities: int = 150) -> None:
    """Entities of KINDS spread over the 12 AREAS, each in its area."""
    for domain in sorted({kind[0] for kind in KINDS}):
        # Their intents (and so the tools) come with the domains' integrations.
        assert await async_setup_component(hass, domain, {})
    areas = [ar.async_get(hass).async_create(name).id for name in AREAS]
    registry = er.async_get(hass)
    for index in range(entities):
        area = AREAS[index % len(AREAS)]
        domain, kind, state, attrs = KINDS[index % len(KINDS)]
        name = f"{area} {kind}" + (f" {index // 50 + 1}" if index >= 50 else "")
        object_id = name.lower().replace(" ", "_")
        entity_id = _add(hass, f"{domain}.{object_id}", name, state, attrs)
        registry.async_update_entity(entity_id, area_id=areas[index % len(areas)])


HOMES: dict[str, Callable[[HomeAssistant], Awaitable[None]]] = {
    "one light": async_one_light,
    "HA demo": async_demo,
    "150 entities, 12 areas": async_generated,
}


@dataclass(frozen=True, slots=True)
class PrefixFigures:
    """One home's prefix: HA's and the compact one, counted."""

    home: str
    tools: int
    ha_qwen3_tokens: int
    """HA's prompt and tools as handed over (YAML list, OpenAPI schemas)."""
    qwen3_tokens: int
    """The compact prefix the runtime receives, counted by Qwen3."""
    instructions_qwen3: int
    tools_qwen3: int
    sim_tokens: int
    sim_over_real_pct: float
    cache_mb_qwen3_06b: float
    build_s_qwen3_06b: float
    build_s_qwen3_4b: float
    cached_ttft_ms_qwen3_06b: float


async def async_home_prefix(
    hass: HomeAssistant, home: str, qwen3: Qwen3, sim_count: Callable[[str], int]
) -> PrefixFigures:
    """Render and count one home's prefixes (the home is set up in hass)."""
    prompt = DEFAULT_PROMPT_FILE.read_text(encoding="utf-8")
    options = {CONF_PROMPT: prompt, CONF_LLM_HASS_API: [llm.LLM_API_ASSIST]}
    with request_chat_log(hass) as (llm_context, chat_log):
        await chat_log.async_provide_llm_data(
            llm_context, [llm.LLM_API_ASSIST], prompt, None
        )
        assert chat_log.llm_api is not None
        system = chat_log.content[0]
        assert isinstance(system, conversation.SystemContent)
        ha_prompt = split_volatile(system.content)[0]
        specs = tool_specs(chat_log.llm_api.tools, chat_log.llm_api.custom_serializer)
    ha_prefix = SystemPrefix(
        prompt=ha_prompt,
        tools_json=json.dumps([spec for _name, spec in specs], ensure_ascii=False),
    )
    prefix, _layout = await async_render_prefix(hass, options)
    real = qwen3.prefix_tokens(prefix)
    sim = sim_count(sim_system_block(prefix))
    instructions = qwen3.count(f"<|im_start|>system\n{prefix.prompt}<|im_end|>\n")
    return PrefixFigures(
        home=home,
        tools=len(json.loads(prefix.tools_json)),
        ha_qwen3_tokens=qwen3.prefix_tokens(ha_prefix),
        qwen3_tokens=real,
        instructions_qwen3=instructions,
        tools_qwen3=real - instructions,
        sim_tokens=sim,
        sim_over_real_pct=round((sim - real) * 100 / real, 1),
        cache_mb_qwen3_06b=round(real * QWEN3_06B_KV_BYTES_PER_TOKEN / 1e6, 1),
        build_s_qwen3_06b=round(real * RK3588_PREFILL_MS / 1000, 1),
        build_s_qwen3_4b=round(real * RK3588_QWEN3_4B_PREFILL_MS / 1000, 1),
        cached_ttft_ms_qwen3_06b=round(
            QUESTION_TOKENS * RK3588_PREFILL_MS + RK3588_DECODE_MS, 1
        ),
    )


async def async_prefix_figures(
    qwen3: Qwen3, sim_count: Callable[[str], int]
) -> list[PrefixFigures]:
    """Count the prefix of every home, each in a Home Assistant of its own."""
    figures: list[PrefixFigures] = []
    for home, setup in HOMES.items():
        with tempfile.TemporaryDirectory() as config_dir:
            async with home_assistant(Path(config_dir)) as hass:
                await async_setup_assist(hass)
                await setup(hass)
                figures.append(await async_home_prefix(hass, home, qwen3, sim_count))
    return figures


def figures_json(figures: list[PrefixFigures]) -> list[dict[str, Any]]:
    """Return the figures as JSON values."""
    return [asdict(figure) for figure in figures]


def print_prefix_table(figures: list[PrefixFigures]) -> None:
    """Print the figures as a table (tokens by Qwen3's tokenizer and template)."""
    print(
        "\nSystem prefix per home (Qwen3 tokens; RK3588 rates: Qwen3-0.6B "
        f"{RK3588_PREFILL_MS} ms/token prefill, 112 KB/token cache; Qwen3-4B "
        f"{RK3588_QWEN3_4B_PREFILL_MS} ms/token)"
    )
    print(
        "| home | tools | HA's form | compact | instructions | tools | simulator "
        "| cache 0.6B | build 0.6B | build 4B | cached TTFT 0.6B |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in figures:
        print(
            f"| {f.home} | {f.tools} | {f.ha_qwen3_tokens} | {f.qwen3_tokens} "
            f"| {f.instructions_qwen3} | {f.tools_qwen3} "
            f"| {f.sim_tokens} ({f.sim_over_real_pct:+.1f} %) "
            f"| {f.cache_mb_qwen3_06b} MB | {f.build_s_qwen3_06b} s "
            f"| {f.build_s_qwen3_4b} s | {f.cached_ttft_ms_qwen3_06b} ms |"
        )
