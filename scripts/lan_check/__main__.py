"""Run the check: each step prints what it saw; any surprise ends it with exit status 1.

1. Two boards on a test LAN, each with a runtime host announcing itself; board B
   behind the shaped link. Home Assistant starts with its zeroconf on both links.
2. Both hosts appear under Discovered; each is confirmed, the host step comes
   filled in with the board's address, and the entry is made (pairing: issue 18
   item 1, the step marked PAIRING below).
3. The agent on each board switches its light.
4. Board B's agent tells a 300-token story over the shaped link, all of it.
5. Board A's cable is pulled: board B's agent answers meanwhile, A's again once
   the cable is back (that A's agents are unavailable meanwhile, within seconds:
   the heartbeat of issue 18 item 4, the step marked HEARTBEAT below).
6. Board A gets a new address and its host restarts: Home Assistant follows it.
7. No "Detected that custom integration" report and no error of ours in the log.
"""

import argparse
from collections.abc import Callable
import json
from pathlib import Path
import shutil
import sys
import tempfile
import time
from typing import Any

from homeassistant.const import __version__ as HA_VERSION
from scripts.newest_ha.instance import (
    ROOT,
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
from tests.board_host import BoardHost, start_board_host
from tests.lan import Board, Lan, Shape
from tests.sim_words import words

DOMAIN = "rockchip_llm"
STORY = words(300)
"""A 300-token answer (one simulator token a word)."""
MODEL_FILE = """\
RKLLM-SIM 1
max_context_limit 4096
decode_ms_per_token 2
reply user turn on the {{name}} => <tool_call>{{"name": "HassTurnOn", "arguments": {{"name": "{{name}}"}}}}</tool_call>
reply user story => {story}
reply tool * => Done.
default => Hello from {board}.
"""
CONFIGURATION = """\
homeassistant:
  name: LAN check
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
zeroconf:
logger:
  default: warning
  logs:
    custom_components.rockchip_llm: info
input_boolean:
  kitchen_lights:
    name: Kitchen lights (state)
  hall_lights:
    name: Hall lights (state)
template:
  - light:
{lights}
"""
LIGHT = """\
      - name: {title} lights
        unique_id: {name}_lights
        state: "{{{{ is_state('input_boolean.{name}_lights', 'on') }}}}"
        turn_on:
          - action: input_boolean.turn_on
            target:
              entity_id: input_boolean.{name}_lights
        turn_off:
          - action: input_boolean.turn_off
            target:
              entity_id: input_boolean.{name}_lights
"""


def step(text: str) -> None:
    """Say what the check does next."""
    print(f"[lan] {text}", flush=True)


class Site:
    """A board, its host, and what Home Assistant made of it."""

    def __init__(self, name: str, light: str, board: Board, folder: Path) -> None:
        """Name a board whose agent switches light."""
        self.name = name
        self.light = light
        self.board = board
        self.folder = folder
        self.host: BoardHost | None = None
        self.entry_id = ""

    @property
    def model(self) -> str:
        """The model on the board (its folder's name)."""
        return f"{self.name.title().replace('-', ' ')} Model"

    @property
    def agent(self) -> str:
        """The entity id of its agent (the model's name and its kind)."""
        return f"conversation.{self.name.replace('-', '_')}_model_conversation"

    def start(self) -> None:
        """Start (or start again) the board's host, announcing itself."""
        self.host = start_board_host(
            self.board,
            self.folder,
            hostname=self.name,
            model_text=MODEL_FILE.format(story=STORY, board=self.name),
            model=self.model,
        )


def make_config(base: Path, port: int, sites: list[Site]) -> Path:
    """Write the configuration, with HA's network adapters on the boards' links."""
    config = base / "config"
    (config / ".storage").mkdir(parents=True)
    (config / "custom_components").symlink_to(ROOT / "custom_components")
    lights = "".join(
        LIGHT.format(title=site.light.title(), name=site.light) for site in sites
    )
    (config / "configuration.yaml").write_text(
        CONFIGURATION.format(port=port, lights=lights)
    )
    # Home Assistant's zeroconf listens on the adapters the network settings enable
    # (by default only the one of the default route): those of the boards' links.
    (config / ".storage" / "core.network").write_text(
        json.dumps(
            {
                "version": 1,
                "minor_version": 1,
                "key": "core.network",
                "data": {
                    "configured_adapters": [site.board.root_device for site in sites]
                },
            }
        )
    )
    return config


def discovered(ha: Instance) -> list[dict[str, Any]]:
    """Return the flows of ours the frontend lists under Discovered."""
    return [
        flow
        for flow in ha.command({"type": "config_entries/flow/progress"})
        if flow["handler"] == DOMAIN
    ]


def suggested(form: dict[str, Any]) -> dict[str, Any]:
    """Return the values a form suggests, by field."""
    return {
        field["name"]: field["description"]["suggested_value"]
        for field in form["data_schema"]
        if "suggested_value" in (field.get("description") or {})
    }


def set_up_discovered(ha: Instance, site: Site, flow: dict[str, Any]) -> None:
    """Confirm the discovered host, take the filled-in address, pick the model."""
    expect(
        flow["step_id"] == "zeroconf_confirm"
        and flow["context"]["source"] == "zeroconf",
        f"{site.name} is offered for confirmation, got {flow}",
    )
    path = f"/api/config/config_entries/flow/{flow['flow_id']}"
    form = ha.post(path, {})
    expect(form.get("step_id") == "host", f"the host step follows, got {form}")
    address = suggested(form).get("host_address")
    expect(
        address == f"{site.board.address}:7823",
        f"the host step has {site.name}'s address filled in, got {address}",
    )
    # PAIRING (issue 18 item 1, branch issue-18a): the host step also asks for the
    # key the host printed at its first start; fill it in here from the host's log.
    form = ha.post(path, {"host_address": address})
    expect(form.get("step_id") == "model", f"the model step follows, got {form}")
    done = ha.post(path, {"model": site.model})
    expect(done.get("type") == "create_entry", f"the entry is made, got {done}")
    expect(
        done["result"]["title"] == f"Rockchip LLM ({site.name})",
        f"the entry is named after the board, got {done['result']['title']}",
    )
    site.entry_id = done["result"]["entry_id"]


def agent_ready(ha: Instance, site: Site) -> None:
    """Wait for the site's agent with its system cache ready."""
    sensor = f"sensor.{site.agent.removeprefix('conversation.')}_prompt_cache"
    wait_for(
        f"{site.name}'s agent",
        lambda: True if (ha.state(sensor) or {}).get("state") == "ready" else None,
    )


def entry_state(ha: Instance, site: Site) -> str:
    """Return the state of the site's entry (loaded, setup_retry, ...)."""
    for entry in ha.get("/api/config/config_entries/entry"):
        if entry["entry_id"] == site.entry_id:
            return str(entry["state"])
    raise CheckFailed(f"{site.name}'s entry is gone")


def allow_long_answers(ha: Instance, site: Site) -> None:
    """Let the site's agent answer 1,024 tokens (its options, as the UI changes them)."""
    [agent] = ha.command(
        {"type": "config_entries/subentries/list", "entry_id": site.entry_id}
    )
    flow = ha.post(
        "/api/config/config_entries/subentries/flow",
        {
            "handler": [site.entry_id, "conversation"],
            "subentry_id": agent["subentry_id"],
        },
    )
    options = suggested(flow) | {"max_new_tokens": 1024}
    done = ha.post(
        f"/api/config/config_entries/subentries/flow/{flow['flow_id']}", options
    )
    expect(done.get("reason") == "reconfigure_successful", f"saved, got {done}")
    wait_for(f"{site.name}'s entry to reload", lambda: _loaded(ha, site))
    agent_ready(ha, site)


def _loaded(ha: Instance, site: Site) -> bool | None:
    return True if entry_state(ha, site) == "loaded" else None


def switch_light(ha: Instance, site: Site) -> None:
    """Check that the site's agent turns its light on."""
    light = f"light.{site.light}_lights"
    expect((ha.state(light) or {}).get("state") == "off", f"{light} starts off")
    answer = converse(ha, site.agent, f"Turn on the {site.light.title()} lights")
    expect(speech(answer) == "Done.", f"{site.name} confirms, got {answer}")
    expect((ha.state(light) or {}).get("state") == "on", f"{light} is on")


def says_hello(ha: Instance, site: Site) -> None:
    """Check that the site's agent answers."""
    answer = converse(ha, site.agent, "Hello")
    expect(
        speech(answer) == f"Hello from {site.name}.", f"{site.name} answers: {answer}"
    )


def tell_story(ha: Instance, site: Site) -> None:
    """300 tokens over the shaped link, every one of them."""
    answer = converse(ha, site.agent, "Tell me a story")
    told = speech(answer)
    expect(
        told == STORY,
        f"the story arrives whole: {len(told.split())} of 300 words",
    )
    counts = site.board.wire_counts()
    step(
        f"  the shaped link forwarded {counts['forwarded']} frames, dropped {counts['dropped']}"
    )
    expect(counts["dropped"] > 0, f"the link lost frames on the way: {counts}")


def pull_cable(ha: Instance, down: Site, other: Site) -> None:
    """One board's link down: the other answers; the first again once it is up."""
    down.board.set_link(up=False)
    try:
        # HEARTBEAT (issue 18 item 4, branch issue-18a): wait here, a few seconds
        # at most, until entry_state(ha, down) is no longer "loaded" and its
        # agent's state is "unavailable".
        says_hello(ha, other)
    finally:
        down.board.set_link(up=True)
    wait_for(f"{down.name} to answer again", lambda: _answers(ha, down))


def _answers(ha: Instance, site: Site) -> bool | None:
    answer = converse(ha, site.agent, "Hello")
    return True if speech(answer) == f"Hello from {site.name}." else None


def move(ha: Instance, site: Site) -> None:
    """Give the board a new address and restart its host: HA must follow it."""
    assert site.host is not None
    site.host.stop()
    old = site.board.address
    site.board.move()
    site.start()
    step(f"  {site.name} moved from {old} to {site.board.address}")
    wait_for(f"{site.name}'s entry at its new address", lambda: _loaded(ha, site))
    wait_for(f"{site.name} to answer there", lambda: _answers(ha, site))


def run(base: Path, lan: Lan) -> None:
    """All the steps, on a fresh configuration in base."""
    sites = [
        Site("board-a", "kitchen", lan.add_board(), base / "board-a"),
        Site("board-b", "hall", lan.add_board(Shape(seed=7)), base / "board-b"),
    ]
    step(
        "boards: "
        + ", ".join(f"{site.name} at {site.board.address}" for site in sites)
        + " (board-b behind 20 ms ± 10 ms and 1 % loss)"
    )
    for site in sites:
        site.start()
    port = free_port()
    ha = Instance(make_config(base, port, sites), port)
    try:
        step(f"starting Home Assistant {HA_VERSION} on port {port}")
        ha.start()
        onboard(ha)
        ha.wait_running()
        step("both hosts found by zeroconf, confirmed and set up")
        flows = wait_for(
            "two discovered hosts",
            lambda: found if len(found := discovered(ha)) == 2 else None,
        )
        by_name = {
            flow["context"]["title_placeholders"]["name"]: flow for flow in flows
        }
        expect(set(by_name) == {"board-a", "board-b"}, f"both boards: {by_name}")
        for site in sites:
            set_up_discovered(ha, site, by_name[site.name])
            agent_ready(ha, site)
        # PAIRING (issue 18 item 1): a wrong key, a plain-text client and a host
        # with a changed certificate are refused with clear messages.
        for site in sites:
            step(f"{site.agent}: switches the {site.light} lights")
            switch_light(ha, site)
        step("board-b tells a 300-token story over the shaped link")
        allow_long_answers(ha, sites[1])
        tell_story(ha, sites[1])
        step("board-a's cable pulled: board-b answers meanwhile, board-a once back")
        pull_cable(ha, sites[0], sites[1])
        step("board-a moves to a new address")
        move(ha, sites[0])
        says_hello(ha, sites[1])
    except CheckFailed:
        print("\n".join(list(ha.log_lines())[-40:]), file=sys.stderr)
        raise
    finally:
        ha.stop()
    check_log(ha)


def timed(what: Callable[[], None]) -> float:
    """Run what; return the seconds it took."""
    start = time.monotonic()
    what()
    return time.monotonic() - start


def main() -> int:
    """Run the check in a temporary folder; keep it when the check fails."""
    parser = argparse.ArgumentParser(
        prog="scripts/check-lan",
        description="Two boards on a test LAN and a real Home Assistant.",
    )
    parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="rockchip-llm-lan-"))
    lan = Lan()
    try:
        took = timed(lambda: run(base, lan))
    except CheckFailed as err:
        print(f"[lan] FAILED: {err} (files kept in {base})", file=sys.stderr)
        return 1
    finally:
        lan.close()
    shutil.rmtree(base)
    step(f"passed on Home Assistant {HA_VERSION} in {took:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
