"""Action errors are the caller's: each action's bad input is a validation error.

Through the REST API that is a 400 (in the HA releases that map it). Input is checked against what the model can hold before the runtime is asked;
an internal error (HTTP 500) stays for internal failures.
"""

from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from unittest.mock import patch

from aiohttp.test_utils import TestClient
import pytest

from custom_components.rockchip_llm.const import CONF_CACHE_BUDGET, DOMAIN
from custom_components.rockchip_llm.run_planner import (
    MIN_REPLY_TOKENS,
    TURN_TEMPLATE_TOKENS,
    estimate_tokens,
)
from homeassistant.components import api as ha_api
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.setup import async_setup_component

from .conftest import EntryFactory, sim_counter

AGENT = "conversation.agent_0"
MODEL = "Qwen3 Sim"

type Client = Callable[[], Awaitable[TestClient]]


# Home Assistant's REST API answers a ServiceValidationError with 400 in newer
# releases (2026.10 does); older ones (2026.6) answer every action error with 500.
REST_MAPS_VALIDATION = hasattr(ha_api, "ServiceValidationError")


@pytest.fixture
async def api(hass: HomeAssistant, hass_client: Client) -> TestClient:
    """An administrator's client of Home Assistant's REST API."""
    assert await async_setup_component(hass, "api", {})
    return await hass_client()


async def post(
    client: TestClient, service: str, data: dict[str, Any], *, response: bool = False
) -> tuple[int, dict[str, Any]]:
    """Call one of our actions as a REST client would; return the status and body."""
    query = "?return_response" if response else ""
    reply = await client.post(f"/api/services/{DOMAIN}/{service}{query}", json=data)
    if reply.content_type != "application/json":  # an unhandled error (older HA)
        return reply.status, {"message": await reply.text()}
    body: dict[str, Any] = await reply.json()
    return reply.status, body


async def refused(
    hass: HomeAssistant,
    client: TestClient,
    service: str,
    data: dict[str, Any],
    *,
    response: bool = False,
) -> str:
    """Call an action that must refuse its input: a validation error, a 400 over REST.

    Returns the message (the same through both ways).
    """
    with pytest.raises(ServiceValidationError) as err:
        await hass.services.async_call(
            DOMAIN, service, data, blocking=True, return_response=response
        )
    if REST_MAPS_VALIDATION:
        status, body = await post(client, service, data, response=response)
        assert status == HTTPStatus.BAD_REQUEST
        assert body["message"] == str(err.value)
    return str(err.value)


def runs(entry: Any) -> int:
    """Runs the runtime was asked for (cache builds included), in every process."""
    return sim_counter(entry, "run")


@pytest.mark.parametrize("length", [20_000, 1_000_000])
async def test_create_cache_with_an_oversized_prompt(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    api: TestClient,
    cache_dir: Path,
    length: int,
) -> None:
    """A prompt the context cannot hold is a 400 naming its size and the context."""
    entry = await make_entry()
    agent = next(iter(entry.runtime_data.agents.values()))
    tools = agent.system_cache.prefix.tools_json  # type: ignore[union-attr]
    before = runs(entry)
    message = await refused(
        hass,
        api,
        "create_cache",
        {"model": MODEL, "name": "big", "prompt": "x" * length},
    )
    tokens = estimate_tokens("x" * length) + estimate_tokens(tools)
    room = 4096 - TURN_TEMPLATE_TOKENS - MIN_REPLY_TOKENS
    assert message == (
        f"The prompt of cache big takes up to {tokens} tokens (its {length} "
        "characters counted at 3 per token, with the tools of the model's agent), "
        "but model Qwen3 Sim was loaded with a context of 4096 tokens, which leaves "
        f"at most {room} tokens for a cached prompt (the rest is kept for a question "
        "and an answer). Shorten the prompt"
    )
    assert runs(entry) == before  # the runtime was not asked
    assert not (cache_dir / MODEL / "big.json").exists()
    # A prompt that fits is built.
    status, _body = await post(
        api, "create_cache", {"model": MODEL, "name": "small", "prompt": "x" * 2000}
    )
    assert status == HTTPStatus.OK
    assert (cache_dir / MODEL / "small.json").exists()


async def test_benchmark_with_an_oversized_question(
    hass: HomeAssistant, make_entry: EntryFactory, api: TestClient
) -> None:
    """A question that does not fit after the system prompt is a 400 with the numbers."""
    entry = await make_entry()
    agent = next(iter(entry.runtime_data.agents.values()))
    prefix_tokens = agent.system_cache.cache.metadata.tokens  # type: ignore[union-attr]
    before = runs(entry)
    message = await refused(
        hass,
        api,
        "benchmark",
        {"agent": AGENT, "question": "on? " * 3000},
        response=True,
    )
    room = 4096 - prefix_tokens - TURN_TEMPLATE_TOKENS - MIN_REPLY_TOKENS
    assert message == (
        f"The benchmark question takes up to {estimate_tokens('on? ' * 3000)} tokens "
        "(counted at 3 characters per token), but model Qwen3 Sim was loaded with a "
        f"context of 4096 tokens, which after the system prompt of {AGENT} "
        f"({prefix_tokens} tokens), a turn and the shortest answer leaves {room} "
        "tokens for it. Shorten the question"
    )
    assert runs(entry) == before
    assert not agent.session.recent


async def test_rebuild_cache_over_the_disk_budget(
    hass: HomeAssistant, make_entry: EntryFactory, api: TestClient, cache_dir: Path
) -> None:
    """A system cache the disk budget cannot take is a 400, found before the runtime runs."""
    entry = await make_entry()
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, CONF_CACHE_BUDGET: 0.001}
    )
    assert await hass.config_entries.async_reload(entry.entry_id)
    before = runs(entry)
    message = await refused(hass, api, "rebuild_cache", {"agent": AGENT})
    assert message.startswith(
        'The prompt cache "system" of model Qwen3 Sim would not fit the cache budget'
    )
    assert runs(entry) == before
    message = await refused(hass, api, "rebuild_cache", {"agent": "conversation.nope"})
    assert "conversation.nope" in message


async def test_list_and_delete_unknown_targets(
    hass: HomeAssistant, make_entry: EntryFactory, api: TestClient
) -> None:
    """An unknown model or cache is a 400 that names it; the runtime is not asked."""
    entry = await make_entry()
    before = runs(entry)
    message = await refused(hass, api, "list_caches", {"model": "Other"}, response=True)
    assert message == 'Model "Other" is not loaded by any Rockchip LLM agent'
    message = await refused(hass, api, "delete_cache", {"model": MODEL, "name": "gone"})
    assert "gone" in message
    assert runs(entry) == before


async def test_internal_failure_stays_an_internal_error(
    in_process_host: None,
    hass: HomeAssistant,
    make_entry: EntryFactory,
    api: TestClient,
) -> None:
    """A failure on input that fits (the disk is full) is a 500: it is not the caller's."""
    await make_entry()
    data = {"model": MODEL, "name": "ok", "prompt": "x" * 100}
    with patch(
        "custom_components.rockchip_llm.host.prompt_cache._write_synced",
        side_effect=OSError(28, "No space left on device"),
    ):
        with pytest.raises(HomeAssistantError) as err:
            await hass.services.async_call(DOMAIN, "create_cache", data, blocking=True)
        status, _body = await post(api, "create_cache", data)
    assert not isinstance(err.value, ServiceValidationError)
    assert str(err.value).startswith(
        "The prompt cache of model Qwen3 Sim could not be written: the disk holding "
    )
    assert status == HTTPStatus.INTERNAL_SERVER_ERROR
