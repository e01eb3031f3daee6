"""The scenario: the simulated home, the voice dialogue and the calibrated model files."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custom_components.rockchip_llm.run_planner import SystemPrefix
from tests.sim_words import words

ROOT = Path(__file__).resolve().parents[2]
SIM_DIR = ROOT / "tests" / "rkllm_sim"
SIM_LIBRARIES = {
    "1.2": SIM_DIR / "build" / "librkllm_sim_1_2.so",
    "1.3": SIM_DIR / "build" / "librkllm_sim_1_3.so",
}

# Published RK3588 figures of Qwen3-0.6B w8a8 (rknn-llm benchmark table).
RK3588_PREFILL_MS = 1.56
RK3588_DECODE_MS = 30.4
QWEN3_06B_KV_BYTES_PER_TOKEN = 114688
"""28 layers x 8 KV heads x 128 dims x 2 (K and V) x fp16: 112 KB per token."""

MODEL_CONTEXT_LIMIT = 4096
"""The simulated models are built for 4,096 tokens (rkllm-toolkit's common choice);
the agents follow that limit (their default context length)."""
STRATEGIES = ("ours", "full_prompt", "cache_per_conversation")
MODEL_NAME = "Qwen3-0.6B RK3588 (simulated)"
ZERO_MODEL_NAME = "Zero delay (simulated)"
WORKER_MODEL_NAME = "Zero delay, worker phase (simulated)"
HANDLES = ("in_process", "worker")
"""RKLLMModel (the binding on a thread of this process) and WorkerModel."""
WORKER_TARGETS = {"us_per_token": 100.0, "ms_per_request": 1.0}
# Our overhead (ours minus the reference agent): per request at most HA's own prompt
# rendering time (a ratio, so it holds on any machine), per token at most 100 µs.
OVERHEAD_TARGETS = {"ratio_to_ha_render": 1.0, "us_per_token": 100.0}
"""Issue 11: what the worker process may add per streamed token and per request."""

# The simulator's Qwen chat template (tests/rkllm_sim/README.md, "Chat template").
USER_START = "<|im_start|>user\n"
TURN_END = "<|im_end|>\n"
ASSISTANT_START = "<|im_start|>assistant\n"
NO_THINK = "<think>\n\n</think>\n\n"


@dataclass(frozen=True, slots=True)
class Turn:
    """One question of the dialogue and the simulated model's scripted answer."""

    question: str
    answer: str
    tool_call: bool = False


# Short voice questions (about 15 simulator tokens each) with short answers.
QUESTIONS: tuple[Turn, ...] = (
    Turn(
        "What is the temperature in the living room right now, please?",
        "It is twenty one degrees in the living room right now.",
    ),
    Turn(
        "And how warm is it in the bedroom at the moment, do you know?",
        "The bedroom is at nineteen and a half degrees.",
    ),
    Turn(
        "Is the front door locked, or should I go and check it myself?",
        "The front door is locked, so there is no need to check.",
    ),
    Turn(
        "Are any of the windows in the house still open at the moment?",
        "Yes, the bathroom window is open right now.",
    ),
    Turn(
        "What is playing on the living room speaker at the moment, please?",
        "The living room speaker is playing jazz at low volume.",
    ),
    Turn(
        "Is the garage door closed now, or is it still open right now?",
        "The garage door is closed, nothing is open in there.",
    ),
    Turn(
        "How much power is the whole house using at the moment, roughly?",
        "The house is using about eight hundred forty watts.",
    ),
    Turn(
        "Which of the lights are still switched on in the house right now?",
        "The living room ceiling light, the floor lamp and the desk lamp are on.",
    ),
    Turn(
        "Thank you, that is all I needed for tonight, so good night then.",
        "Good night, sleep well, and see you tomorrow morning.",
    ),
)
TOOL_TURN = Turn(
    "Could you please turn on the kitchen light for me right now?",
    '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "Kitchen Light"}}</tool_call>',
    tool_call=True,
)
TOOL_ANSWER = "Done, the kitchen light is on now."
DEFAULT_ANSWER = "Sorry, I did not understand that."
MAX_TURNS = len(QUESTIONS) + 1

CELSIUS = {"unit_of_measurement": "°C", "device_class": "temperature"}
DOOR = {"device_class": "door"}
WINDOW = {"device_class": "window"}

# area -> (entity_id, name, state, attributes): 30 exposed entities in 7 areas.
type EntitySpec = tuple[str, str, str, dict[str, Any]]
HOME: dict[str, tuple[EntitySpec, ...]] = {
    "Kitchen": (
        ("light.kitchen_light", "Kitchen Light", "off", {}),
        ("light.kitchen_counter", "Kitchen Counter Lights", "off", {}),
        ("switch.coffee_maker", "Coffee Maker", "off", {}),
        ("sensor.kitchen_temperature", "Kitchen Temperature", "21.5", CELSIUS),
        ("binary_sensor.fridge_door", "Fridge Door", "off", DOOR),
    ),
    "Living Room": (
        ("light.living_room_ceiling", "Living Room Ceiling", "on", {}),
        ("light.floor_lamp", "Floor Lamp", "on", {}),
        (
            "media_player.living_room_speaker",
            "Living Room Speaker",
            "playing",
            {"media_title": "Blue in Green", "volume_level": 0.2},
        ),
        ("sensor.living_room_temperature", "Living Room Temperature", "21.0", CELSIUS),
        ("cover.living_room_blinds", "Living Room Blinds", "open", {}),
        (
            "climate.thermostat",
            "Thermostat",
            "heat",
            {"current_temperature": 21.0, "temperature": 21.5},
        ),
    ),
    "Bedroom": (
        ("light.bedroom_light", "Bedroom Light", "off", {}),
        ("light.bedside_lamp", "Bedside Lamp", "off", {}),
        ("sensor.bedroom_temperature", "Bedroom Temperature", "19.5", CELSIUS),
        ("cover.bedroom_shutters", "Bedroom Shutters", "closed", {}),
        ("binary_sensor.bedroom_window", "Bedroom Window", "off", WINDOW),
    ),
    "Bathroom": (
        ("light.bathroom_light", "Bathroom Light", "off", {}),
        ("switch.towel_warmer", "Towel Warmer", "on", {}),
        (
            "sensor.bathroom_humidity",
            "Bathroom Humidity",
            "62",
            {"unit_of_measurement": "%", "device_class": "humidity"},
        ),
        ("binary_sensor.bathroom_window", "Bathroom Window", "on", WINDOW),
    ),
    "Office": (
        ("light.desk_lamp", "Desk Lamp", "on", {}),
        ("switch.monitor_power", "Monitor Power", "on", {}),
        ("sensor.office_temperature", "Office Temperature", "22.0", CELSIUS),
        (
            "sensor.office_co2",
            "Office CO2",
            "650",
            {"unit_of_measurement": "ppm", "device_class": "carbon_dioxide"},
        ),
    ),
    "Hallway": (
        ("light.hallway_light", "Hallway Light", "off", {}),
        ("lock.front_door", "Front Door Lock", "locked", {}),
        ("binary_sensor.front_door", "Front Door", "off", DOOR),
        (
            "sensor.house_power",
            "House Power",
            "840",
            {"unit_of_measurement": "W", "device_class": "power"},
        ),
    ),
    "Garage": (
        ("cover.garage_door", "Garage Door", "closed", {"device_class": "garage"}),
        ("light.garage_light", "Garage Light", "off", {}),
    ),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """What to run (from the command line)."""

    turns: int
    tool_turn: int
    prefill_ms: float
    decode_ms: float
    cache_bytes_per_token: int
    overhead_requests: int
    overhead_reply_tokens: int
    overhead_rounds: int
    worker_repetitions: int
    worker_reply_tokens: int
    abi: str
    json_path: Path | None
    plot_path: Path | None
    verbose: bool
    startup_cache: Path | None = None
    """Only measure one start with this (persistent) cache folder."""
    cache_hash_mb: int = 256
    """The size of the file whose content hash is measured (cache_hash.py)."""

    def dialogue(self) -> list[Turn]:
        """Return the questions asked, in order, with the tool call at tool_turn."""
        turns = list(QUESTIONS)
        if 1 <= self.tool_turn <= self.turns:
            turns.insert(self.tool_turn - 1, TOOL_TURN)
        return turns[: self.turns]

    def model_file(self) -> str:
        """Return the calibrated model of the dialogue (see model_file)."""
        return model_file(
            self.dialogue(),
            self.prefill_ms,
            self.decode_ms,
            self.cache_bytes_per_token,
        )


# The simulated model files
def model_file(
    dialogue: Sequence[Turn],
    prefill_ms: float,
    decode_ms: float,
    cache_bytes_per_token: int = 0,
) -> str:
    """Return the simulated model: calibrated delays and the dialogue's answers.

    The simulator answers the latest request of the conversation it reads (a tool
    result for the latest call gets the tool rule), however each strategy sends
    the history, so one rule per question serves all of them.
    """
    lines = [
        "RKLLM-SIM 1",
        f"max_context_limit {MODEL_CONTEXT_LIMIT}",
        f"prefill_ms_per_token {prefill_ms}",
        f"decode_ms_per_token {decode_ms}",
        f"cache_bytes_per_token {cache_bytes_per_token}",
        f"reply tool * => {TOOL_ANSWER}",
    ]
    lines += [
        f"reply user {turn.question.rstrip('?.!')} => {turn.answer}"
        for turn in dialogue
    ]
    lines.append(f"default => {DEFAULT_ANSWER}")
    return "\n".join(lines) + "\n"


def zero_model_replies(reply_tokens: int) -> dict[str, str]:
    """Return the replies of the overhead phase by question (a short and a long one)."""
    return {
        "short request": "OK.",
        "long request": words(reply_tokens),  # one simulator token each
    }


def zero_model_file(reply_tokens: int) -> str:
    """Return the zero-delay model of the overhead phase."""
    replies = zero_model_replies(reply_tokens)
    return (
        "\n".join(
            (
                "RKLLM-SIM 1",
                f"max_context_limit {MODEL_CONTEXT_LIMIT}",
                "prefill_ms_per_token 0",
                "decode_ms_per_token 0",
                *(f"reply user {text} => {reply}" for text, reply in replies.items()),
                "default => OK.",
            )
        )
        + "\n"
    )


def write_model(models_dir: Path, name: str, text: str) -> Path:
    """Write a model folder holding one simulated .rkllm file."""
    folder = models_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.rkllm"
    path.write_text(text, encoding="utf-8")
    return path


# The conversation as the simulator templates it


def system_block(prefix: SystemPrefix) -> str:
    """Return the system block the simulator builds in rkllm_set_function_tools."""
    return (
        f"<|im_start|>system\n{prefix.prompt}\n\n# Tools\n<tools>\n"
        f"{prefix.tools_json}\n</tools>{TURN_END}"
    )


def user_turn_text(question: str) -> str:
    """Return a user turn as the simulator templates it (thinking off)."""
    return f"{USER_START}{question}{TURN_END}{ASSISTANT_START}{NO_THINK}"


def tool_turn_text(result: str) -> str:
    """Return a tool turn as the simulator templates it (thinking off)."""
    return (
        f"{USER_START}<tool_response>\n{result}\n</tool_response>"
        f"{TURN_END}{ASSISTANT_START}{NO_THINK}"
    )
