"""Home Assistant and hosts on a LAN with latency and loss, and links that go down.

The boards are network namespaces of a test LAN (tests/lan.py); a shaped link
delays each frame by 20 ms ± 10 ms and drops 1 % of them, as ``tc netem`` would
(the test machines' kernel has no netem, tests/lan_wire.py stands in for it).
"""

import asyncio
from datetime import timedelta
from functools import partial
import os
from pathlib import Path
import time

import pytest
from pytest_homeassistant_custom_component.common import (
    MockConfigEntry,
    async_fire_time_changed,
)

from custom_components.rockchip_llm.const import (
    CONF_HOST_ADDRESS,
    CONF_HOST_IDENTITY,
    CONF_MAX_NEW_TOKENS,
    CONF_MODEL,
    CONF_PAIRING_KEY,
    DOMAIN,
    SUBENTRY_CONVERSATION,
)
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState, ConfigSubentryData
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import entity_registry as er
from homeassistant.util import dt as dt_util

from .board_host import BoardHost, start_board_host
from .conftest import model_text
from .lan import Lan, Shape
from .sim_words import words
from .test_conversation import speech

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="network namespaces (ip netns) need root"
)

STORY = words(300)
"""A 300-token answer (one simulator token a word)."""
NOTICED_WITHIN = 20.0
"""Seconds a link that went down may take to be noticed (a heartbeat's few)."""


def start(hass_lan: Lan, folder: Path, name: str, shape: Shape | None) -> BoardHost:
    """A board (on a shaped link, if given) whose host tells the story."""
    return start_board_host(
        hass_lan.add_board(shape),
        folder,
        hostname=name,
        model_text=model_text(
            replies=(f"reply user story => {STORY}", f"default => Hello from {name}."),
            decode_ms_per_token=2,
        ),
    )


async def add(hass: HomeAssistant, host: BoardHost) -> tuple[MockConfigEntry, str]:
    """An entry for the host with one agent that may answer 1,024 tokens."""
    entry = MockConfigEntry(
        domain=DOMAIN,
        title=f"Rockchip LLM ({host.address})",
        unique_id=host.identity,
        data={
            CONF_HOST_ADDRESS: host.address,
            CONF_PAIRING_KEY: host.pairing_key,
            CONF_HOST_IDENTITY: host.identity,
        },
        subentries_data=[
            ConfigSubentryData(
                data={CONF_MODEL: "Qwen3 Sim", CONF_MAX_NEW_TOKENS: 1024},
                subentry_type=SUBENTRY_CONVERSATION,
                title=f"Agent on {host.address}",
                unique_id=None,
            )
        ],
    )
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    [agent] = [
        item.entity_id
        for item in er.async_entries_for_config_entry(
            er.async_get(hass), entry.entry_id
        )
        if item.domain == conversation.DOMAIN
    ]
    return entry, agent


async def ask(hass: HomeAssistant, agent: str, text: str = "Hello") -> str:
    """Say text to an agent; return its answer."""
    result = await conversation.async_converse(
        hass, text, None, Context(), agent_id=agent
    )
    return speech(result)


async def test_a_long_answer_crosses_a_slow_lossy_link_whole(
    hass: HomeAssistant, ha_base: None, hass_lan: Lan, tmp_path: Path
) -> None:
    """300 tokens streamed over 20 ms ± 10 ms and 1 % loss arrive, all of them."""
    host = await hass.async_add_executor_job(
        start, hass_lan, tmp_path / "a", "board-a", Shape(seed=7)
    )
    entry, agent = await add(hass, host)
    assert entry.state is ConfigEntryState.LOADED
    assert await ask(hass, agent, "Tell me a story") == STORY
    counts = await hass.async_add_executor_job(host.board.wire_counts)
    assert counts["dropped"] > 0, counts  # the link did lose frames on the way
    assert counts["forwarded"] > 300, counts


async def test_a_link_down_makes_only_its_agents_unavailable(
    hass: HomeAssistant, ha_base: None, hass_lan: Lan, tmp_path: Path
) -> None:
    """Cable pulled on one board: its agents unavailable in seconds, back when up."""
    a = await hass.async_add_executor_job(
        partial(start, hass_lan, tmp_path / "a", "board-a", None)
    )
    b = await hass.async_add_executor_job(
        partial(start, hass_lan, tmp_path / "b", "board-b", Shape())
    )
    (entry_a, agent_a), (entry_b, agent_b) = await add(hass, a), await add(hass, b)

    await hass.async_add_executor_job(partial(a.board.set_link, up=False))
    deadline = time.monotonic() + NOTICED_WITHIN
    while entry_a.state is ConfigEntryState.LOADED:
        assert time.monotonic() < deadline, "the link down was not noticed"
        await asyncio.sleep(0.1)
    await hass.async_block_till_done()
    state = hass.states.get(agent_a)
    assert state is not None and state.state == "unavailable"
    assert entry_b.state is ConfigEntryState.LOADED
    assert await ask(hass, agent_b) == "Hello from board-b."

    await hass.async_add_executor_job(partial(a.board.set_link, up=True))
    async_fire_time_changed(hass, dt_util.utcnow() + timedelta(minutes=2))
    await hass.async_block_till_done(wait_background_tasks=True)
    assert entry_a.state is ConfigEntryState.LOADED
    assert await ask(hass, agent_a) == "Hello from board-a."
