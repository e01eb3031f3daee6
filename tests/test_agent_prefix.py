"""The cached system prefix is the same in every process and at every second."""

import json
import os
import subprocess
import sys
from typing import Any

from freezegun.api import FrozenDateTimeFactory

from custom_components.rockchip_llm.agent_prefix import (
    canonical_schema,
    compact,
    split_volatile,
)
from custom_components.rockchip_llm.ha_compat import vol
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import HomeAssistant
from homeassistant.helpers import llm, template

from .conftest import REPO, EntryFactory, last_run_record
from .test_conversation import converse, model_session

# Builds a tool whose enum list comes from a set of strings, as HA does for some
# slots (HassTurnOn's device_class on HA 2026.6), and prints its tools JSON.
_CHILD = """
from homeassistant.helpers import config_validation as cv, llm
from custom_components.rockchip_llm.agent_prefix import tool_specs
from custom_components.rockchip_llm.compact_prefix import compact_prefix
from custom_components.rockchip_llm.ha_compat import vol

class Tool(llm.Tool):
    name = "HassTurnOn"
    description = "Turns on a device"
    parameters = vol.Schema({
        vol.Optional("device_class"): vol.All(
            cv.ensure_list,
            [vol.In(list({"awning", "blind", "curtain", "damper", "door", "garage",
                          "gate", "shade", "shutter", "window", "outlet", "switch"}))],
        ),
        vol.Optional("name"): cv.string,
    })

    async def async_call(self, hass, tool_input, llm_context):
        return {}

print(compact_prefix("", tool_specs([Tool()], llm.selector_serializer)).tools_json)
"""


def _tools_json_in_child(seed: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD],
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_tools_json_is_the_same_under_every_hash_seed() -> None:
    """Two processes with different hash seeds serialise the same tools identically."""
    outputs = {_tools_json_in_child(seed) for seed in ("1", "2", "3", "4")}
    assert len(outputs) == 1
    enum = json.loads(outputs.pop())[0]["function"]["parameters"]["properties"][
        "device_class"
    ]["enum"]
    assert enum == sorted(enum)


def test_canonical_schema_sorts_unordered_lists_only() -> None:
    """Enum values and required keys are sorted; other lists keep their order."""
    schema = {
        "anyOf": [{"required": ["b", "a"]}, {"enum": [3, 1, 2]}],
        "items": {"enum": ["z", "a"]},
    }
    assert canonical_schema(schema) == {
        "anyOf": [{"required": ["a", "b"]}, {"enum": [1, 2, 3]}],
        "items": {"enum": ["a", "z"]},
    }


class _CountedValidator:
    """A validator that counts how often its text was rendered."""

    renders = 0

    def __call__(self, value: Any) -> Any:
        return value

    def __repr__(self) -> str:
        type(self).renders += 1
        return "<counted validator>"


def _api_with(slots: Any) -> llm.APIInstance:
    """An API instance with a new tool and schema around slots, as each request has.

    (HA's intent tools copy their handler's slot schema, a dict, into a new one.)
    """

    class _Tool(llm.Tool):
        name = "Counted"
        description = "Counts"
        parameters = vol.Schema({**slots} if isinstance(slots, dict) else slots)

        async def async_call(self, *_args: Any) -> Any:
            return {}

    return llm.APIInstance(
        api=None,  # type: ignore[arg-type]
        api_prompt="",
        llm_context=None,  # type: ignore[arg-type]
        tools=[_Tool()],
    )


def test_compact_reuses_a_request_made_of_the_same_validators() -> None:
    """New tool objects around the same validators are found without rendering them.

    New validators of the same text are found by their text; another prompt is
    compacted anew.
    """
    slots = {vol.Optional("value"): _CountedValidator()}
    first = compact("prompt A", _api_with(slots))
    renders = _CountedValidator.renders
    assert compact("prompt A", _api_with(slots)) is first
    assert _CountedValidator.renders == renders  # not rendered again

    same_text = compact(
        "prompt A", _api_with({vol.Optional("value"): _CountedValidator()})
    )
    assert same_text is first
    assert _CountedValidator.renders > renders

    other = compact("prompt B", _api_with(slots))
    assert other[1].prompt != first[1].prompt
    assert json.loads(other[1].tools_json) == json.loads(first[1].tools_json)

    whole = _CountedValidator()  # a schema that is one validator, not a dict
    found = compact("prompt A", _api_with(whole))
    renders = _CountedValidator.renders
    assert compact("prompt A", _api_with(whole)) is found
    assert _CountedValidator.renders == renders


def test_split_volatile() -> None:
    """HA's date-time line is split from the prompt; a prompt without it is unchanged."""
    prompt = (
        "You are a voice assistant.\n"
        "Current time is 09:05:01. Today's date is 2026-11-30.\n"
        "\nBe brief."
    )
    assert split_volatile(prompt) == (
        "You are a voice assistant.\n\nBe brief.",
        "Current time is 09:05:01. Today's date is 2026-11-30.",
    )
    assert split_volatile("Be brief.") == ("Be brief.", "")


async def test_agent_without_api_keeps_time_out_of_the_cache(
    hass: HomeAssistant, make_entry: EntryFactory, freezer: FrozenDateTimeFactory
) -> None:
    """The time line of an agent without tools goes with the turn, not the prefix.

    So the prefix stays the same over time: no rebuild, the system cache serves.
    """
    entry = await make_entry({CONF_LLM_HASS_API: []})
    loaded = model_session(entry)
    agent = next(iter(entry.runtime_data.agents.values()))
    cache_before = agent.system_cache.cache
    assert cache_before is not None
    await converse(hass, "hello")
    record = last_run_record(entry)
    assert "Current time is" not in record["system"]
    assert "Current time is" in record["prompt"]
    freezer.tick(61)
    await converse(hass, "hello again")
    await hass.async_block_till_done()
    # The follow-up started before HA rendered its prompt, with HA's own line.
    rendered = template.Template(llm.DATE_TIME_PROMPT, hass).async_render(
        parse_result=False
    )
    assert split_volatile(rendered)[1] in last_run_record(entry)["prompt"]
    assert (loaded._held.prefix_key or "").startswith(agent.system_cache.prefix.key)  # type: ignore[union-attr]
    assert agent.system_cache.cache is cache_before
    assert all(run.cache == cache_before.name for run in loaded.recent)
