"""Run the check: each step prints what it saw; any surprise ends it with exit status 1.

1. Onboard a user and set the integration up with its config flow (REST API).
2. A conversation whose tool call switches a template light (the agent is called
   directly: no local intent handling in front of the model).
3. A message on a conversation whose turn still runs, and a turn that fails:
   both read well, and the model answers the next message.
4. The cache actions: list_caches, rebuild_cache.
5. A restart (homeassistant.restart, then started again as a supervisor would):
   the system cache is loaded, not built again.
6. No "Detected that custom integration" report and no error of ours in the log.
"""

import argparse
from pathlib import Path
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

from homeassistant.const import __version__ as HA_VERSION
from tests.sim_words import words

from .instance import (
    RESTART_EXIT_CODE,
    ROOT,
    SIMULATOR,
    CheckFailed,
    Instance,
    check_log,
    converse,
    expect,
    free_port,
    onboard,
    speech,
    wait_for,
)

MODEL = "Check Model"
DEFAULT_REPLY = "I am a simulated model."
STORY = words(150)  # one simulator token each
MODEL_FILE = f"""\
RKLLM-SIM 1
# The real-process check's simulated model: a story slow enough to ask twice meanwhile.
max_context_limit 4096
decode_ms_per_token 10
reply user turn on the {{name}} => <tool_call>{{"name": "HassTurnOn", "arguments": {{"name": "{{name}}"}}}}</tool_call>
reply user story => {STORY}
reply tool * => Done.
default => {DEFAULT_REPLY}
"""
CONFIGURATION = """\
homeassistant:
  name: Check
  time_zone: UTC
  country: DE
  language: en
  unit_system: metric
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
config:
conversation:
logger:
  default: warning
  logs:
    custom_components.rockchip_llm: info
input_boolean:
  kitchen_lights:
    name: Kitchen lights (state)
template:
  - light:
      - name: Kitchen lights
        unique_id: kitchen_lights
        state: "{{{{ is_state('input_boolean.kitchen_lights', 'on') }}}}"
        turn_on:
          - action: input_boolean.turn_on
            target:
              entity_id: input_boolean.kitchen_lights
        turn_off:
          - action: input_boolean.turn_off
            target:
              entity_id: input_boolean.kitchen_lights
"""
BUSY = (
    "Sorry, I am still answering your previous message in this conversation. "
    "Ask again when I have finished"
)
BUILT = "Built prompt cache"


def step(text: str) -> None:
    """Say what the check does next."""
    print(f"[newest-ha] {text}", flush=True)


def make_config(base: Path) -> Path:
    """Write a fresh configuration folder with the simulated model; return it."""
    config = base / "config"
    model_dir = config / "rkllm" / "models" / MODEL
    model_dir.mkdir(parents=True)
    (model_dir / "check.rkllm").write_text(MODEL_FILE)
    (config / "custom_components").symlink_to(ROOT / "custom_components")
    return config


def set_up(ha: Instance, config: Path) -> None:
    """Add the integration with its config flow, as the UI does."""
    flow = ha.post("/api/config/config_entries/flow", {"handler": "rockchip_llm"})
    expect(
        flow.get("type") == "menu" and "local" in flow.get("menu_options", ()),
        f"the flow asks where the runtime runs, got {flow}",
    )
    flow = ha.post(
        f"/api/config/config_entries/flow/{flow['flow_id']}", {"next_step_id": "local"}
    )
    expect(
        flow.get("step_id") == "simulator",
        f"the flow offers the simulator step, got {flow}",
    )
    flow = ha.post(
        f"/api/config/config_entries/flow/{flow['flow_id']}",
        {
            "library_path": str(SIMULATOR),
            "models_dir": str(config / "rkllm" / "models"),
            "cache_dir": str(config / "rkllm" / "cache"),
        },
    )
    expect(flow.get("step_id") == "model", f"the flow asks for the model, got {flow}")
    flow = ha.post(
        f"/api/config/config_entries/flow/{flow['flow_id']}", {"model": MODEL}
    )
    expect(flow.get("type") == "create_entry", f"the entry is created, got {flow}")


def agent_ready(ha: Instance) -> str:
    """Wait for the agent and its system cache; return the agent's entity id."""
    sensor = wait_for(
        "the prompt cache sensor",
        lambda: next(iter(ha.entity_ids("sensor.", "_prompt_cache")), None),
    )
    wait_for(
        "a ready system cache",
        lambda: True if (ha.state(sensor) or {}).get("state") == "ready" else None,
    )
    agents = [
        entity
        for entity in ha.entity_ids("conversation.")
        if entity != "conversation.home_assistant"
    ]
    expect(len(agents) == 1, f"one agent, got {agents}")
    return agents[0]


def check_tool_call(ha: Instance, agent: str) -> None:
    """Check that the model's tool call switches the template light."""
    light = ha.state("light.kitchen_lights") or {}
    expect(light.get("state") == "off", f"the kitchen lights start off, got {light}")
    answer = converse(ha, agent, "Turn on the kitchen lights")
    expect(speech(answer) == "Done.", f"the model confirms, got {answer}")
    light = ha.state("light.kitchen_lights") or {}
    expect(light.get("state") == "on", f"the light is on, got {light}")


def model_busy(ha: Instance) -> bool:
    """Return whether the agent's Busy sensor is on."""
    sensors = ha.entity_ids("binary_sensor.", "_busy")
    expect(len(sensors) == 1, f"one Busy sensor, got {sensors}")
    return (ha.state(sensors[0]) or {}).get("state") == "on"


def check_busy_and_failed_turns(ha: Instance, agent: str) -> None:
    """Check that a busy conversation and a failed turn read well, the model free."""
    first: dict[str, Any] = {}
    story = threading.Thread(
        target=lambda: first.update(converse(ha, agent, "Tell me a story", "busy"))
    )
    story.start()
    wait_for("the story's turn to run", lambda: True if model_busy(ha) else None)
    second = converse(ha, agent, "Are you there?", "busy")
    story.join(120)
    expect(
        second["response"]["response_type"] == "error" and speech(second) == BUSY,
        f"the busy conversation says so, got {second}",
    )
    expect(speech(first) == STORY, f"the story was told in full, got {first}")
    expect(not model_busy(ha), "the model is free after the story")
    third = converse(ha, agent, "Hello", "busy")
    expect(
        speech(third) == DEFAULT_REPLY,
        f"the conversation goes on, got {third}",
    )

    failed = converse(ha, agent, "ab " * 5000, "failing")
    expect(
        failed["response"]["response_type"] == "error"
        and speech(failed).startswith("Sorry, that is too long for me"),
        f"a too long message is refused in words, got {failed}",
    )
    expect(not model_busy(ha), "the model is free after the failed turn")
    after = converse(ha, agent, "Hello", "failing")
    expect(
        speech(after) == DEFAULT_REPLY,
        f"the conversation goes on after the failed turn, got {after}",
    )


def action(ha: Instance, name: str, data: dict[str, Any] | None = None) -> Any:
    """Call one of our actions and return its response."""
    answer = ha.post(f"/api/services/rockchip_llm/{name}?return_response", data)
    return answer["service_response"]


def system_cache(ha: Instance) -> dict[str, Any]:
    """Return the system cache's entry in list_caches."""
    caches = [
        cache
        for cache in action(ha, "list_caches")["caches"]
        if cache["name"] == "system"
    ]
    expect(len(caches) == 1 and caches[0]["valid"], f"one valid system cache: {caches}")
    found: dict[str, Any] = caches[0]
    return found


def check_cache_actions(ha: Instance) -> str:
    """rebuild_cache writes a new system cache, list_caches shows it; its created_at."""
    before = system_cache(ha)["created_at"]
    rebuilt = action(ha, "rebuild_cache")["caches"]
    expect(len(rebuilt) == 1, f"one cache rebuilt, got {rebuilt}")
    created_at: str = rebuilt[0]["created_at"]
    expect(created_at != before, "the rebuilt cache is new")
    expect(
        system_cache(ha)["created_at"] == created_at, "list_caches shows the rebuild"
    )
    return created_at


def check_restart(ha: Instance, created_at: str) -> None:
    """After a restart the system cache is loaded from disk, not built again."""
    ha.post("/api/services/homeassistant/restart")
    code = ha.wait_exit()
    expect(code == RESTART_EXIT_CODE, f"hass asks to be restarted, got {code}")
    ha.start()
    ha.wait_running()
    agent = agent_ready(ha)
    expect(
        system_cache(ha)["created_at"] == created_at,
        "the restarted instance kept the cache",
    )
    built = [line for line in ha.log.read_text().splitlines() if BUILT in line]
    expect(not built, f"no cache was built after the restart, got {built}")
    answer = converse(ha, agent, "Hello")
    expect(speech(answer) == DEFAULT_REPLY, f"it answers, got {answer}")


def run(base: Path) -> None:
    """All the steps, on a fresh configuration in base."""
    config = make_config(base)
    port = free_port()
    (config / "configuration.yaml").write_text(CONFIGURATION.format(port=port))
    ha = Instance(config, port)
    try:
        step(f"starting Home Assistant {HA_VERSION} on port {port}")
        ha.start()
        onboard(ha)
        ha.wait_running()
        step("setting up the integration with its config flow")
        set_up(ha, config)
        agent = agent_ready(ha)
        step(f"{agent}: a tool call that switches a template light")
        check_tool_call(ha, agent)
        step("a busy conversation and a failed turn")
        check_busy_and_failed_turns(ha, agent)
        step("the cache actions")
        created_at = check_cache_actions(ha)
        step("a restart that reuses the system cache")
        check_restart(ha, created_at)
    except CheckFailed:
        print("\n".join(list(ha.log_lines())[-40:]), file=sys.stderr)
        raise
    finally:
        ha.stop()
    check_log(ha)


def main() -> int:
    """Run the check in a temporary folder; keep it when the check fails."""
    parser = argparse.ArgumentParser(
        prog="scripts/check-newest-ha",
        description="The integration in a real Home Assistant process.",
    )
    parser.parse_args()
    start = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="rockchip-llm-newest-ha-"))
    try:
        run(base)
    except CheckFailed as err:
        print(f"[newest-ha] FAILED: {err} (files kept in {base})", file=sys.stderr)
        return 1
    shutil.rmtree(base)
    step(f"passed on Home Assistant {HA_VERSION} in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
