"""A conversation that mixes commands Home Assistant handles itself and model turns.

Run as the Assist dialog runs it: an Assist pipeline with "Prefer handling commands
locally" on, over HA's websocket API (assist_pipeline/run, text in, intent out).
"""

from typing import Any

from pytest_homeassistant_custom_component.common import async_mock_service
from pytest_homeassistant_custom_component.typing import WebSocketGenerator

from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import intent
from homeassistant.setup import async_setup_component

from .conftest import EntryFactory, last_run_record

AGENT = "conversation.agent_0"


class Dialog:
    """The Assist dialog: one conversation through one pipeline."""

    def __init__(self, client: Any, pipeline_id: str) -> None:
        """Talk to pipeline_id over client."""
        self._client = client
        self._pipeline = pipeline_id
        self.conversation_id: str | None = None

    async def say(self, text: str) -> dict[str, Any]:
        """Send text; return the intent-end event's data (the pipeline's answer)."""
        await self._client.send_json_auto_id(
            {
                "type": "assist_pipeline/run",
                "start_stage": "intent",
                "end_stage": "intent",
                "input": {"text": text},
                "pipeline": self._pipeline,
                "conversation_id": self.conversation_id,
            }
        )
        assert (await self._client.receive_json())["success"]
        intent_end: dict[str, Any] = {}
        while True:
            event = (await self._client.receive_json())["event"]
            assert event["type"] != "error", event
            if event["type"] == "intent-end":
                intent_end = event["data"]
            if event["type"] == "run-end":
                break
        self.conversation_id = intent_end["intent_output"]["conversation_id"]
        return intent_end


def speech(intent_end: dict[str, Any]) -> str:
    """The answer the dialog shows."""
    text: str = intent_end["intent_output"]["response"]["speech"]["plain"]["speech"]
    return text


async def test_follow_up_after_a_locally_handled_command(
    hass: HomeAssistant,
    make_entry: EntryFactory,
    hass_ws_client: WebSocketGenerator,
) -> None:
    """HA's own turn reads as HA's; the follow-up is the request the model answers."""
    assert await async_setup_component(hass, "intent", {})
    assert await async_setup_component(hass, "assist_pipeline", {})
    hass.states.async_set("light.kitchen", "off", {"friendly_name": "Kitchen lights"})
    async_expose_entity(hass, conversation.DOMAIN, "light.kitchen", True)
    turned_on = async_mock_service(hass, "light", "turn_on")
    entry = await make_entry()
    client = await hass_ws_client(hass)
    await client.send_json_auto_id(
        {
            "type": "assist_pipeline/pipeline/create",
            "conversation_engine": AGENT,
            "conversation_language": "*",
            "language": "en",
            "name": "Local first",
            "stt_engine": None,
            "stt_language": None,
            "tts_engine": None,
            "tts_language": None,
            "tts_voice": None,
            "wake_word_entity": None,
            "wake_word_id": None,
            "prefer_local_intents": True,
        }
    )
    created = await client.receive_json()
    assert created["success"], created
    dialog = Dialog(client, created["result"]["id"])

    first = await dialog.say("What can you do?")
    assert first["processed_locally"] is False
    assert speech(first) == "Hello from the simulator."

    command = await dialog.say("Turn on the kitchen lights")
    assert command["processed_locally"] is True  # the model was not asked
    assert len(turned_on) == 1
    handled = speech(command)
    assert handled

    follow_up = await dialog.say("Thanks! What did I ask you first?")
    assert follow_up["processed_locally"] is False
    assert (
        speech(follow_up) == "Hello from the simulator."
    )  # an answer, not a tool call
    response = follow_up["intent_output"]["response"]
    assert response["response_type"] != "error"
    assert len(turned_on) == 1  # the model did not act on the earlier command
    prompt = last_run_record(entry)["prompt"]
    # What Home Assistant did is told as Home Assistant's, and the request comes last.
    assert (
        "Home Assistant handled this itself, without you: "
        'the user said "Turn on the kitchen lights"; Home Assistant ran HassTurnOn '
    ) in prompt
    assert f'answered "{handled}".' in prompt
    turn = prompt.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]
    assert turn.startswith("Home Assistant handled this itself")  # KV holds turn 1
    assert turn.endswith("\n\nNow the user says: Thanks! What did I ask you first?")
    assert "Assistant: {" not in prompt  # HA's call is not shown as the model's


async def test_a_turn_with_only_an_invalid_tool_call_claims_no_action(
    hass: HomeAssistant, make_entry: EntryFactory
) -> None:
    """The model's only call was not valid JSON: the answer is an error, not action_done."""
    await make_entry(
        model_kwargs={
            "replies": (
                'reply user broken => <tool_call>{"name": "HassTurnOn", </tool_call>',
                "reply tool * => Done.",
                "default => Hello.",
            )
        }
    )
    result = await conversation.async_converse(
        hass, "broken", None, Context(), agent_id=AGENT
    )
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert result.response.error_code is intent.IntentResponseErrorCode.FAILED_TO_HANDLE
    assert result.response.speech["plain"]["speech"] == "Done."
    # A plain answer in the same conversation is not affected.
    result = await conversation.async_converse(
        hass, "hello", result.conversation_id, Context(), agent_id=AGENT
    )
    assert result.response.response_type is not intent.IntentResponseType.ERROR
    assert result.response.speech["plain"]["speech"] == "Hello."
