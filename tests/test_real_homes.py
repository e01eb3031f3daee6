"""Real homes fit: HA's demo home on a 4,096-token model, the compact form, trimming."""

from collections.abc import Iterator
import itertools
import json
from typing import Any

from awesomeversion import AwesomeVersion
import pytest
from pytest_homeassistant_custom_component.components.diagnostics import (
    get_diagnostics_for_config_entry,
)
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.rockchip_llm.agent_prefix import async_render_prefix
from custom_components.rockchip_llm.compact_prefix import resolve_shared
from custom_components.rockchip_llm.const import (
    CONF_MAX_CONTEXT_LEN,
    CONF_PROMPT,
    CONF_TOOL_GROUPS,
    DEFAULT_PROMPT_FILE,
    DOMAIN,
)
from custom_components.rockchip_llm.prefix_report import prefix_issue_id
from custom_components.rockchip_llm.tool_groups import ToolGroup, tool_group
from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.const import (
    CONF_LLM_HASS_API,
    STATE_UNAVAILABLE,
    __version__ as HA_VERSION,
)
from homeassistant.core import HomeAssistant
from homeassistant.helpers import entity_registry as er, issue_registry as ir, llm
from homeassistant.setup import async_setup_component
from scripts.benchmark.qwen3 import load_qwen3

from .conftest import EntryFactory
from .test_conversation import converse, model_session, speech
from .test_repairs import start_fix, submit_fix

DEMO_OPTIONS = {
    CONF_PROMPT: DEFAULT_PROMPT_FILE.read_text(encoding="utf-8"),
    CONF_LLM_HASS_API: [llm.LLM_API_ASSIST],
}


# The demo integration's entities poll: their timers outlive a test.
pytestmark = pytest.mark.parametrize("expected_lingering_timers", [True])


@pytest.fixture
async def demo_home(hass: HomeAssistant) -> None:
    """Home Assistant's demo integration, with intents."""
    assert await async_setup_component(hass, "homeassistant", {})
    assert await async_setup_component(hass, "intent", {})
    assert await async_setup_component(hass, "demo", {"demo": {}})
    await hass.async_block_till_done()


def _context_sensor(hass: HomeAssistant, entry: Any) -> Any:
    """The state of the context use sensor of the entry's agent."""
    subentry_id = next(iter(entry.subentries))
    entity_id = er.async_get(hass).async_get_entity_id(
        "sensor", DOMAIN, f"{subentry_id}_context_use"
    )
    assert entity_id is not None
    return hass.states.get(entity_id)


def _calls(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every call a compact schema allows, one value per kind (all enum values)."""
    properties: dict[str, Any] = spec.get("properties", {})
    required = set(spec.get("required", []))

    def values(schema: dict[str, Any]) -> list[Any]:
        if "enum" in schema:
            return list(schema["enum"])
        if "anyOf" in schema:
            return [v for option in schema["anyOf"] for v in values(option)]
        kind = schema.get("type")
        if kind == "integer":
            return [schema.get("minimum", 0), schema.get("maximum", 100)]
        if kind == "number":
            return [schema.get("minimum", 0.5)]
        if kind == "boolean":
            return [True, False]
        if kind == "array":
            return [values(schema.get("items", {"type": "string"}))[:2]]
        return ["Kitchen Lights"]

    # HA's own schemas say only "string" (color) or nothing (is_volume_muted) here.
    samples: dict[str, list[Any]] = {
        "color": ["red", "blue"],
        "is_volume_muted": [True, False],
    }
    for name, schema in properties.items():
        if name in samples and "enum" not in schema:
            for value in samples[name]:
                yield {name: value}
            continue
        base = {key: values(properties[key])[0] for key in required}
        for value in values(schema):
            yield {**base, name: value}
    yield {key: values(properties[key])[0] for key in required}


async def test_every_compact_tool_call_passes_ha_validation(
    hass: HomeAssistant, demo_home: None
) -> None:
    """Each call the compact tools allow (shared values resolved) passes HA's schema."""
    prefix, _layout = await async_render_prefix(hass, DEMO_OPTIONS)
    api = await llm.async_get_api(
        hass,
        llm.LLM_API_ASSIST,
        llm.LLMContext(DOMAIN, None, "en", conversation.DOMAIN, None),
    )
    tools = {tool.name: tool for tool in api.tools}
    compact = json.loads(prefix.tools_json)
    assert {spec["function"]["name"] for spec in compact} == set(tools)
    assert "additionalProperties" not in prefix.tools_json
    assert '"$ref"' in prefix.tools_json  # device_class lists are written once
    checked = 0
    for spec in compact:
        function = spec["function"]
        schema = resolve_shared(function["parameters"], prefix.prompt)
        assert "$ref" not in json.dumps(schema)
        for call in _calls(schema):
            tools[function["name"]].parameters(call)
            checked += 1
    assert checked > 200


async def test_demo_home_fits_a_4096_token_model(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    demo_home: None,
    make_entry: EntryFactory,
) -> None:
    """Default settings, a model built for 4,096: the full prefix, 512 tokens left, a light on."""
    entry = await make_entry(DEMO_OPTIONS)
    session = model_session(entry)
    agent = next(iter(entry.runtime_data.agents.values()))
    assert session.params.max_context_len == 4096  # followed the model's limit
    assert agent.system_cache is not None
    assert agent.system_cache.fit is not None
    assert agent.system_cache.fit.fits
    assert agent.system_cache.trim == 0
    prefix = agent.system_cache.prefix
    assert prefix is not None
    cached = agent.system_cache.cache
    assert cached is not None
    assert cached.metadata is not None
    assert cached.metadata.prompt_sha256 == prefix.prompt_sha256
    real = load_qwen3().prefix_tokens(prefix)
    # Users run HA 2026.10+ (512 tokens left there); HA 2026.6's Assist API takes
    # more words (about 3,700 tokens here), which still leaves room for a turn.
    assert 4096 - real >= (512 if AwesomeVersion(HA_VERSION) >= "2026.10" else 300)
    # The simulator never counts fewer than Qwen3 (0 to +10 %).
    assert real <= cached.metadata.tokens <= real * 1.1
    api = await llm.async_get_api(
        hass,
        llm.LLM_API_ASSIST,
        llm.LLMContext(DOMAIN, None, "en", conversation.DOMAIN, None),
    )
    offered = {spec["function"]["name"] for spec in json.loads(prefix.tools_json)}
    assert offered == {tool.name for tool in api.tools}
    state = _context_sensor(hass, entry)
    assert state is not None
    assert state.state != STATE_UNAVAILABLE
    assert state.attributes["prefix_tokens"] == cached.metadata.tokens
    assert state.attributes["counted_by"] == "runtime"
    assert state.attributes["model_context_limit"] == 4096
    assert state.attributes["left_out"] == []
    split = state.attributes
    assert (
        split["instructions_tokens"]
        + split["device_list_tokens"]
        + split["tools_tokens"]
        == cached.metadata.tokens
    )
    assert set(split["tool_tokens"]) == offered
    diagnostics = await get_diagnostics_for_config_entry(hass, hass_client, entry)
    tokens = diagnostics["agents"][agent.subentry_id]["prefix"]["tokens"]
    assert tokens["prefix_tokens"] == cached.metadata.tokens
    assert tokens["tool_tokens"] == split["tool_tokens"]
    assert hass.states.get("light.bed_light").state == "off"
    result = await converse(hass, "Turn on the Bed Light")
    assert speech(result) == "Done."
    await hass.async_block_till_done()
    assert hass.states.get("light.bed_light").state == "on"


async def test_prefix_trimmed_to_fit_and_back(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """A context too small for the device list: the agent leaves it out, says so, comes back."""
    assert await async_setup_component(hass, "intent", {})
    for index in range(40):
        entity_id = f"light.lamp_{index}"
        hass.states.async_set(entity_id, "off", {"friendly_name": f"Lamp {index}"})
        async_expose_entity(hass, conversation.DOMAIN, entity_id, True)
    entry = await make_entry({CONF_MAX_CONTEXT_LEN: 1536})
    agent = next(iter(entry.runtime_data.agents.values()))
    keeper = agent.system_cache
    assert keeper is not None
    assert keeper.fit is not None
    assert keeper.fit.fits
    assert keeper.trim == 1
    assert keeper.prefix is not None
    assert "Lamp 17" not in keeper.prefix.prompt
    assert "GetLiveContext" in keeper.prefix.prompt
    issue = ir.async_get(hass).async_get_issue(
        DOMAIN, prefix_issue_id(entry.entry_id, agent.subentry_id)
    )
    assert issue is not None
    assert issue.translation_key == "prefix_trimmed"
    assert issue.is_fixable
    assert issue.translation_placeholders is not None
    assert issue.translation_placeholders["left_out"] == "the device list"
    state = _context_sensor(hass, entry)
    assert state is not None
    assert state.attributes["left_out"] == ["device_list"]
    assert state.attributes["full_prefix_tokens"] > state.attributes["prefix_tokens"]
    result = await converse(hass, "Turn on the Lamp 3")
    assert speech(result) == "Done."
    # Fewer devices exposed: the full prefix fits again, the repair goes.
    for index in range(4, 40):
        async_expose_entity(hass, conversation.DOMAIN, f"light.lamp_{index}", False)
    await keeper.async_refresh_now()
    assert keeper.trim == 0
    assert "Lamp 3" in keeper.prefix.prompt
    assert (
        ir.async_get(hass).async_get_issue(
            DOMAIN, prefix_issue_id(entry.entry_id, agent.subentry_id)
        )
        is None
    )


async def test_prefix_that_never_fits_keeps_the_agent_and_offers_a_way_out(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    make_entry: EntryFactory,
) -> None:
    """Even trimmed the prompt overflows: entities explain, Assist says where, the fix flow fixes."""
    entry = await make_entry(
        {
            CONF_PROMPT: "Be brief. " + "Remember this. " * 500,
            CONF_MAX_CONTEXT_LEN: 1024,
        }
    )
    agent = next(iter(entry.runtime_data.agents.values()))
    assert agent.system_cache is not None
    assert agent.system_cache.fit is not None
    assert not agent.system_cache.fit.fits
    state = _context_sensor(hass, entry)
    assert state is not None
    assert state.state != STATE_UNAVAILABLE
    assert state.attributes["fits"] is False
    assert state.attributes["max_context_len"] == 1024
    assert state.attributes["prefix_tokens"] > 1024 - 96
    issue_id = prefix_issue_id(entry.entry_id, agent.subentry_id)
    issue = ir.async_get(hass).async_get_issue(DOMAIN, issue_id)
    assert issue is not None
    assert issue.translation_key == "prefix_does_not_fit"
    assert issue.is_fixable
    result = await converse(hass, "Hello")
    assert "Repairs" in speech(result)
    # The fix flow: the context up to the model's limit (4,096), tool groups.
    assert await async_setup_component(hass, "repairs", {})
    client_flow = await start_fix(hass_client, issue_id)
    assert client_flow["type"] == "form"
    assert client_flow["description_placeholders"]["limit"] == "4096"
    assert "/config/voice-assistants/expose" in str(
        client_flow["description_placeholders"]
    )
    client = await hass_client()
    refused = await client.post(
        f"/api/repairs/issues/fix/{client_flow['flow_id']}",
        json={CONF_MAX_CONTEXT_LEN: 8192, CONF_TOOL_GROUPS: ["lights_switches"]},
    )
    assert refused.status == 400  # above the model's limit: the form's box refuses
    done = await submit_fix(
        hass_client,
        client_flow["flow_id"],
        {CONF_MAX_CONTEXT_LEN: 4096, CONF_TOOL_GROUPS: ["lights_switches", "context"]},
    )
    assert done["type"] == "create_entry"
    await hass.async_block_till_done()
    assert ir.async_get(hass).async_get_issue(DOMAIN, issue_id) is None
    await hass.async_block_till_done()
    subentry = next(iter(entry.subentries.values()))
    assert subentry.data[CONF_MAX_CONTEXT_LEN] == 4096
    assert subentry.data[CONF_TOOL_GROUPS] == ["lights_switches", "context"]
    agent = next(iter(entry.runtime_data.agents.values()))
    assert agent.system_cache is not None
    assert agent.system_cache.fit is not None
    assert agent.system_cache.fit.fits
    assert er.async_get(hass).async_get_entity_id(
        "conversation", DOMAIN, subentry.subentry_id
    )


async def test_tool_groups_option_offers_only_those_tools(
    hass: HomeAssistant, demo_home: None, make_entry: EntryFactory
) -> None:
    """An agent offered lights and switches and context tools sees and can call only those."""
    groups = [ToolGroup.LIGHTS_SWITCHES.value, ToolGroup.CONTEXT.value]
    entry = await make_entry({**DEMO_OPTIONS, CONF_TOOL_GROUPS: groups})
    agent = next(iter(entry.runtime_data.agents.values()))
    assert agent.system_cache is not None
    prefix = agent.system_cache.prefix
    assert prefix is not None
    names = [spec["function"]["name"] for spec in json.loads(prefix.tools_json)]
    assert names
    assert {tool_group(name) for name in names} == set(groups)
    assert not any("Media" in name for name in names)
    result = await converse(hass, "Turn on the Bed Light")
    assert speech(result) == "Done."


def test_tool_groups_cover_every_demo_tool_name() -> None:
    """Every group has a name in strings.json (the selector's labels)."""
    from .conftest import PACKAGE  # noqa: PLC0415

    strings = json.loads((PACKAGE / "strings.json").read_text())
    assert set(strings["selector"]["tool_groups"]["options"]) == {
        group.value for group in ToolGroup
    }
    assert list(itertools.chain(ToolGroup)) == list(ToolGroup)
