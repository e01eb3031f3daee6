"""Run the check: each step prints what it saw; any surprise ends it with exit status 1.

1. Two boards on a test LAN, each with a runtime host on ``--tcp 0.0.0.0`` with
   a state folder of its own (its identity and pairing key); board B behind the
   shaped link. Home Assistant starts with its zeroconf on both links.
2. Both hosts appear under Discovered; each is confirmed, the host step comes
   filled in with the board's address and asks for the key; a wrong key is a
   form error (and the host logs the refusal); the key the host printed pairs it.
3. The agent on each board switches its light.
4. A plain-text client gets nothing from board A, whose host logs "Refused".
5. Board B's agent tells a 300-token story over the shaped link, all of it.
6. Board A's cable is pulled: its entry and agent go unavailable within seconds
   (the heartbeat), board B's agent answers meanwhile, A's again once it is back.
7. Board A gets a new address while its host runs: the host announces itself
   there and Home Assistant follows it.
8. Board A's host loses its state folder (a new certificate and key): the entry
   asks to pair again (reauth) and is repaired with the new key.
9. No "Detected that custom integration" report and no error of ours in the log.

Each step prints what it saw and its time; a summary of the times ends the run.
"""

import argparse
from collections.abc import Callable, Iterator
import contextlib
import json
from pathlib import Path
import secrets
import shutil
import socket
import sys
import tempfile
import time
from typing import Any

from custom_components.rockchip_llm.host.identity import (
    PAIRING_KEY_BYTES,
    format_pairing_key,
)
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


TIMES: list[tuple[str, float]] = []
"""Each step's name and seconds, for the summary."""


@contextlib.contextmanager
def timed_step(text: str) -> Iterator[None]:
    """Say what the check does next; afterwards how long it took (kept for the summary)."""
    step(text)
    start = time.monotonic()
    yield
    took = time.monotonic() - start
    TIMES.append((text, took))
    step(f"  done in {took:.1f} s")


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
    def running(self) -> BoardHost:
        """The board's host (started)."""
        assert self.host is not None
        return self.host

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


def refusal(site: Site) -> str:
    """Quote the last refusal the site's host logged."""
    [*_, line] = (
        line for line in site.running.log_text().splitlines() if "Refused " in line
    )
    return "the host logged " + repr(line[line.index("Refused ") :])


def set_up_discovered(
    ha: Instance, site: Site, flow: dict[str, Any], *, wrong_key: bool = False
) -> None:
    """Confirm the discovered host, take the filled-in address, pair, pick the model."""
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
    form = ha.post(path, {"host_address": address})
    expect(
        form.get("errors") == {"pairing_key": "pairing_key_required"},
        f"the host step asks for the pairing key, got {form}",
    )
    if wrong_key:
        wrong = format_pairing_key(secrets.token_bytes(PAIRING_KEY_BYTES))
        form = ha.post(path, {"host_address": address, "pairing_key": wrong})
        expect(
            form.get("errors") == {"pairing_key": "host_pairing_refused"},
            f"a wrong key is a form error, got {form}",
        )
        site.running.wait_log("Refused ")
        step(f"  a wrong key: form error host_pairing_refused; {refusal(site)}")
    form = ha.post(
        path, {"host_address": address, "pairing_key": site.running.pairing_key}
    )
    expect(form.get("step_id") == "model", f"the model step follows, got {form}")
    done = ha.post(path, {"model": site.model})
    expect(done.get("type") == "create_entry", f"the entry is made, got {done}")
    expect(
        done["result"]["title"] == f"Rockchip LLM ({site.name})",
        f"the entry is named after the board, got {done['result']['title']}",
    )
    site.entry_id = done["result"]["entry_id"]
    expect(
        flow["context"]["unique_id"] == site.running.identity,
        f"announced as the identity the host printed, got {flow['context']}",
    )


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
    """Pull one board's cable: its agent unavailable in seconds, the other answers.

    The first answers again once its link is up.
    """
    down.board.set_link(up=False)
    start = time.monotonic()
    try:
        wait_for(
            f"{down.name}'s entry to notice",
            lambda: True if entry_state(ha, down) != "loaded" else None,
            timeout=30,
        )
        wait_for(
            f"{down.name}'s agent to be unavailable",
            lambda: (
                True
                if (ha.state(down.agent) or {}).get("state") == "unavailable"
                else None
            ),
            timeout=30,
        )
        step(
            f"  {down.name}'s entry {entry_state(ha, down)} and its agent unavailable "
            f"{time.monotonic() - start:.1f} s after the link went down"
        )
        says_hello(ha, other)
        step(f"  {other.name} answered meanwhile")
    finally:
        down.board.set_link(up=True)
    start = time.monotonic()
    wait_for(f"{down.name}'s entry to load again", lambda: _loaded(ha, down))
    wait_for(f"{down.name} to answer again", lambda: _answers(ha, down))
    step(f"  {down.name} answers again {time.monotonic() - start:.1f} s after link up")


def plain_text_client(site: Site) -> None:
    """Say hello in plain text: nothing comes back; the host logs the refusal."""
    with socket.create_connection((site.board.address, site.running.port), 10) as sock:
        sock.sendall(b'{"id": 1, "op": "hello", "args": {"client": "plain"}}\n')
        sock.settimeout(30)
        try:
            answer = sock.recv(65536)
        except ConnectionResetError:
            answer = b""
    expect(answer == b"", f"a plain-text client gets nothing, got {answer!r}")
    site.running.wait_log("no TLS handshake (plain text")
    step(f"  closed without a byte; {refusal(site)}")


def changed_certificate(ha: Instance, site: Site) -> None:
    """Lose the host's state folder: HA refuses the new identity, asks to pair again."""
    old = site.running.identity
    site.running.stop()
    shutil.rmtree(site.folder / "state")
    site.start()
    step(
        f"  {site.name} restarted with identity {site.running.identity[:19]}… (was {old[:19]}…)"
    )

    def reauth() -> dict[str, Any] | None:
        flows: list[dict[str, Any]] = ha.command(
            {"type": "config_entries/flow/progress"}
        )
        for flow in flows:
            context = flow["context"]
            if context["source"] == "reauth" and context["entry_id"] == site.entry_id:
                return flow
        return None

    flow = wait_for(f"{site.name}'s entry to ask to pair again", reauth)
    state = entry_state(ha, site)
    expect(state == "setup_error", f"the entry is stopped, got {state}")
    [entry] = [
        entry
        for entry in ha.get("/api/config/config_entries/entry")
        if entry["entry_id"] == site.entry_id
    ]
    expect(
        "identity changed" in str(entry["reason"]),
        f"the entry says the identity changed, got {entry['reason']}",
    )
    step(f"  the entry: {entry['reason']}")
    path = f"/api/config/config_entries/flow/{flow['flow_id']}"
    form = ha.get(path)
    expect(form.get("step_id") == "reauth_confirm", f"the reauth form, got {form}")
    done = ha.post(path, {"pairing_key": site.running.pairing_key})
    expect(done.get("reason") == "reauth_successful", f"re-paired, got {done}")
    wait_for(f"{site.name}'s entry to load again", lambda: _loaded(ha, site))
    wait_for(f"{site.name} to answer again", lambda: _answers(ha, site))
    step(f"  re-paired with the new key: {site.name} answers")
    expect(not discovered(ha), "the new identity at the entry's address is not offered")


def _entry_connections(site: Site) -> int:
    """How many times the site's entry has connected to its host so far."""
    return site.running.log_text().count(f"/{site.entry_id} (")


def _answers(ha: Instance, site: Site) -> bool | None:
    answer = converse(ha, site.agent, "Hello")
    return True if speech(answer) == f"Hello from {site.name}." else None


def move(ha: Instance, site: Site) -> None:
    """Give the board a new address (its host runs on): HA must follow it."""
    old = site.board.address
    connections = _entry_connections(site)
    site.board.move()
    step(f"  {site.name} moved from {old} to {site.board.address}")
    site.running.wait_log(f"at {site.board.address}")  # announced there
    step(f"  {site.name}'s host announced itself at {site.board.address}")
    wait_for(
        f"{site.name}'s entry to connect again (at the only address there is)",
        lambda: True if _entry_connections(site) > connections else None,
    )
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
        with timed_step("both hosts found by zeroconf, paired and set up"):
            flows = wait_for(
                "two discovered hosts",
                lambda: found if len(found := discovered(ha)) == 2 else None,
            )
            by_name = {
                flow["context"]["title_placeholders"]["name"]: flow for flow in flows
            }
            expect(set(by_name) == {"board-a", "board-b"}, f"both boards: {by_name}")
            for site in sites:
                set_up_discovered(
                    ha, site, by_name[site.name], wrong_key=site is sites[0]
                )
                agent_ready(ha, site)
        for site in sites:
            with timed_step(f"{site.agent}: switches the {site.light} lights"):
                switch_light(ha, site)
        with timed_step("a plain-text client at board-a"):
            plain_text_client(sites[0])
        with timed_step("board-b tells a 300-token story over the shaped link"):
            allow_long_answers(ha, sites[1])
            tell_story(ha, sites[1])
        with timed_step("board-a's cable pulled (ip link set down), then back up"):
            pull_cable(ha, sites[0], sites[1])
        with timed_step("board-a moves to a new address"):
            move(ha, sites[0])
            says_hello(ha, sites[1])
        with timed_step("board-a's host with a new certificate (state folder lost)"):
            changed_certificate(ha, sites[0])
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
    for text, seconds in TIMES:
        step(f"  {seconds:5.1f} s  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
