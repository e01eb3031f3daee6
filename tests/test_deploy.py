"""How users start the runtime host: the systemd unit, the Dockerfile, the compose file.

Docker does not run on the test machines, and systemd is not their init. So the
tests take the exact commands the unit and the image run, expanded as systemd and
Docker would, and run them with the machine's Debian 12 /usr/bin/python3 (the
board's and the image's interpreter) in a root of their own whose mounts are the
unit's folders or the compose file's volumes (tests/isolated_root.py), against the
simulator; Home Assistant's side then connects at the socket path it is told to
use, and the host must answer hello.
"""

import asyncio
from collections.abc import AsyncIterator
import contextlib
import os
from pathlib import Path
import re
import shutil
import signal
import stat
import subprocess
from typing import Any

import pytest
import pytest_socket
import yaml

from custom_components.rockchip_llm.host.version import HOST_VERSION
from custom_components.rockchip_llm.link import (
    HostAddress,
    TcpHost,
    UnixHost,
    async_connect,
)

from .conftest import PACKAGE, REPO, SIM_BUILD, model_text
from .isolated_root import Bind, start_isolated

DEPLOY = PACKAGE / "host" / "deploy"
UNIT = DEPLOY / "rockchip-llm-host.service"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
BOARD_PYTHON = Path("/usr/bin/python3")
SIMULATOR = SIM_BUILD / "librkllm_sim_1_3.so"
DEBUGFS = "/sys/kernel/debug"
SERVICE_UID = 61234
"""Stands in for the user systemd allocates (DynamicUser=yes)."""
START_TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mount namespaces (unshare --mount) need root"
)


@pytest.fixture
def host_sockets() -> None:
    """Let the test connect to a host on a Unix socket or 127.0.0.1, nowhere else.

    Home Assistant's test plugin blocks both; the next test's setup blocks them again.
    """
    pytest_socket.enable_socket()
    pytest_socket.socket_allow_hosts(["127.0.0.1"], allow_unix_socket=True)


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections, each a list of (key, value) in order (keys repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"continued line: {raw}"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"entry before any section: {raw}"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {raw}"
        current.append((key.strip(), value.strip()))
    return sections


def values(entries: list[tuple[str, str]], key: str) -> list[str]:
    """Every value of key."""
    return [value for name, value in entries if name == key]


def one(entries: list[tuple[str, str]], key: str) -> str:
    """The one value of key."""
    found = values(entries, key)
    assert len(found) == 1, f"{key}: {found}"
    return found[0]


def expand_command(line: str, env: dict[str, str]) -> list[str]:
    """An ExecStart line as systemd runs it: "$NAME" splits, "${NAME}" stays one word."""
    assert '"' not in line and "'" not in line, "quoting is not emulated here"
    argv: list[str] = []
    for word in line.split():
        if (whole := re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)) is not None:
            argv += env[whole.group(1)].split()
            continue
        argv.append(
            re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m[1]], word)
        )
    return argv


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """A Dockerfile's instructions (continued lines joined), as (NAME, arguments)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    instructions = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, rest = line.strip().partition(" ")
            instructions.append((name.upper(), rest.strip()))
    return instructions


def exec_form(instructions: list[tuple[str, str]], name: str) -> list[str]:
    """The JSON (exec form) argument list of the last ENTRYPOINT or CMD."""
    found = [rest for instruction, rest in instructions if instruction == name]
    assert found, f"no {name}"
    words = yaml.safe_load(found[-1])  # JSON arrays are YAML flow sequences
    assert isinstance(words, list), f"{name} must be in exec form: {found[-1]}"
    return [str(word) for word in words]


def volume_map(
    service: dict[str, Any], compose_dir: Path, named: Path
) -> dict[str, Bind]:
    """A compose service's volumes: container path -> the board's file or folder."""
    binds: dict[str, Bind] = {}
    for volume in service["volumes"]:
        source, target, *mode = str(volume).split(":")
        if source.startswith((".", "/")):
            path = (
                (compose_dir / source).resolve()
                if source.startswith(".")
                else Path(source)
            )
        else:
            path = named / source  # a named volume
        binds[target] = Bind(path, read_only=mode == ["ro"])
    return binds


def board_path(container_path: str, binds: dict[str, Bind]) -> Path:
    """Where a container path is on the board, through the longest matching volume."""
    target = max(
        (
            target
            for target in binds
            if container_path.startswith(target.rstrip("/") + "/")
        ),
        key=len,
    )
    return binds[target].source / container_path.removeprefix(target).lstrip("/")


def container_path(board: Path, binds: dict[str, Bind]) -> str:
    """Where a board path is in a container, through the volume that holds it."""
    for target, bind in binds.items():
        if board.is_relative_to(bind.source):
            return str(Path(target) / board.relative_to(bind.source))
    raise AssertionError(f"{board} is not in any volume")


def write_sim_model(models: Path) -> None:
    """A simulated model folder, as a user puts it in the models folder."""
    (models / "Qwen3 Sim").mkdir(parents=True)
    (models / "Qwen3 Sim" / "model.rkllm").write_text(model_text())


def board_python_version() -> str:
    """The version of the board's interpreter, asserted to be 3.11 or newer."""
    assert BOARD_PYTHON.exists(), f"{BOARD_PYTHON} (Debian 12's python3) is missing"
    version = subprocess.run(
        [str(BOARD_PYTHON), "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert tuple(int(part) for part in version.split(".")) >= (3, 11), version
    return version


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path,
    argv: list[str],
    binds: dict[str, Bind],
    *,
    env: dict[str, str],
    user: int | None = None,
    umask: int = 0o022,
) -> AsyncIterator[str]:
    """Start a host isolated, yield where it says it listens, stop it (SIGTERM)."""
    log = tmp_path / "host.log"
    with log.open("wb") as output:
        process = start_isolated(
            argv,
            binds,
            tmp_path / "root",
            env=env,
            stderr=output,
            user=user,
            umask=umask,
        )
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not (
                    found := re.search(
                        r"^listening on (.+)$", log.read_text(), re.MULTILINE
                    )
                ):
                    assert process.poll() is None, f"the host ended:\n{log.read_text()}"
                    await asyncio.sleep(0.05)
            yield found.group(1)
            process.send_signal(signal.SIGTERM)
            returncode = await asyncio.get_running_loop().run_in_executor(
                None, process.wait, 30
            )
            assert returncode == 0, log.read_text()
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


async def hello_at(address: HostAddress) -> dict[str, Any]:
    """Connect as Home Assistant does, say hello, scan the models, disconnect."""
    link, hello = await async_connect(address, "test-deploy/entry")
    try:
        hello["models"] = await link.request("models.scan")
    finally:
        await link.async_close()
    return hello


def check_hello(hello: dict[str, Any], option: dict[str, str]) -> None:
    """The host of this release, on the simulator, serving the command's folders."""
    assert hello["host_version"] == HOST_VERSION
    assert hello["runtime"]["simulated"] is True
    assert (hello["library_path"], hello["models_dir"], hello["cache_dir"]) == (
        option["--library"],
        option["--models"],
        option["--cache"],
    )
    assert hello["cache_writable"] is True
    assert [model["name"] for model in hello["models"]["models"]] == ["Qwen3 Sim"]


def test_systemd_unit_verifies() -> None:
    """systemd's own checker accepts the unit, and its exposure stays low."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "scripts/setup installs systemd-analyze (Debian's systemd)"
    verify = subprocess.run(
        [analyze, "verify", str(UNIT)], capture_output=True, text=True, check=False
    )
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    security = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=40", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert security.returncode == 0, security.stdout[-2000:]


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {
            "RKLLM_LISTEN": "--tcp 127.0.0.1:0",
            "RKLLM_OPTIONS": "--cache-budget-mb 4096 --stall-timeout 20",
        },
    ],
    ids=["defaults", "tcp-and-options"],
)
async def test_systemd_unit_command_serves(
    tmp_path: Path, host_sockets: None, settings: dict[str, str]
) -> None:
    """ExecStart, expanded as systemd does, serves Home Assistant.

    With the unit's defaults (its socket) and with settings a user puts in
    /etc/default/rockchip-llm-host. It runs as an unprivileged user in a root that
    has only the unit's folders writable, as DynamicUser= and ProtectSystem=strict
    leave them.
    """
    board_python_version()
    service = dict(unit_entries(UNIT.read_text()))["Service"]
    env = dict(
        value.strip('"').split("=", 1) for value in values(service, "Environment")
    )
    assert values(service, "EnvironmentFile") == ["-/etc/default/rockchip-llm-host"]
    env |= settings
    argv = expand_command(one(service, "ExecStart"), env)
    assert argv[:4] == [
        str(BOARD_PYTHON),
        "-I",
        "-S",
        f"{env['HA_CONFIG']}/custom_components/rockchip_llm/host",
    ]
    assert one(service, "DynamicUser") == "yes"
    assert one(service, "ProtectSystem") == "strict"
    assert one(service, "Restart") == "on-failure"
    assert {"video", "render"} <= set(one(service, "SupplementaryGroups").split())
    option = dict(zip(argv[4::2], argv[5::2], strict=True))
    cache_folder = "/var/cache/" + one(service, "CacheDirectory")
    socket_folder = "/run/" + one(service, "RuntimeDirectory")
    state_folder = "/var/lib/" + one(service, "StateDirectory")
    assert option["--cache"] == cache_folder

    models, cache, sockets = tmp_path / "models", tmp_path / "cache", tmp_path / "run"
    state = tmp_path / "state"
    write_sim_model(models)
    for folder in (cache, sockets, state):
        folder.mkdir()
        os.chown(folder, SERVICE_UID, SERVICE_UID)  # systemd does it for its folders
    binds = {
        argv[3]: Bind(PACKAGE / "host", read_only=True),
        option["--library"]: Bind(SIMULATOR, read_only=True),
        state_folder: Bind(state),  # before the models folder, which is inside it
        option["--models"]: Bind(models, read_only=True),
        cache_folder: Bind(cache),
        socket_folder: Bind(sockets),
    }
    async with running(
        tmp_path,
        argv,
        binds,
        # systemd tells the service its state folder; openssl is the board's
        env={"PATH": "/usr/bin:/bin", "STATE_DIRECTORY": state_folder},
        user=SERVICE_UID,
        umask=int(one(service, "UMask"), 8),
    ) as where:
        address: HostAddress
        if "--socket" in option:
            assert where == option["--socket"]
            assert Path(where).parent == Path(socket_folder)
            socket = sockets / Path(where).name
            mode = socket.stat()
            assert stat.S_IMODE(mode.st_mode) == 0o660
            assert mode.st_uid == SERVICE_UID
            address = UnixHost(socket)
        else:
            found = re.fullmatch(r"\('127\.0\.0\.1', (\d+)\)", where)
            assert found, where
            # The key it printed, and made in systemd's state folder.
            log = (tmp_path / "host.log").read_text()
            [key] = re.findall(r"^pairing key (\S+)$", log, re.MULTILINE)
            assert (state / "pairing-key").read_text() == key + "\n"
            address = TcpHost("127.0.0.1", int(found.group(1)), pairing_key=key)
        hello = await hello_at(address)
    check_hello(hello, option)
    if "--cache-budget-mb" in option:
        assert (
            hello["cache_budget_bytes"] == int(option["--cache-budget-mb"]) * 1_000_000
        )


def test_dockerfile_is_debian_with_python3_and_openssl() -> None:
    """The image: Debian bookworm-slim, python3 and openssl, the host's code mounted."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    assert instructions[0] == ("FROM", "debian:bookworm-slim")
    installs = [
        rest
        for name, rest in instructions
        if name == "RUN" and "apt-get install" in rest
    ]
    assert len(installs) == 1
    packages = installs[0].split("apt-get install", 1)[1].split("&&")[0].split()
    # openssl makes the host's certificate at its first start on TCP.
    assert sorted(word for word in packages if not word.startswith("-")) == [
        "openssl",
        "python3",
    ]
    assert not [name for name, _ in instructions if name in {"COPY", "ADD"}]


async def test_compose_host_serves_home_assistant(
    tmp_path: Path, host_sockets: None
) -> None:
    """The image's command with the compose file's volumes answers HA's hello.

    The board is a compose folder whose ./config is HA's /config with the
    integration in it; HA connects at the socket path the README gives, which it
    sees through its own volumes.
    """
    board_python_version()
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    compose = yaml.safe_load(COMPOSE.read_text())
    host = compose["services"]["rockchip-llm-host"]
    ha = compose["services"]["homeassistant"]
    assert ha["image"].startswith("ghcr.io/home-assistant/home-assistant:")
    assert host["privileged"] is True
    assert host["build"] == "./config/custom_components/rockchip_llm/host/deploy"
    argv = exec_form(instructions, "ENTRYPOINT") + (
        [str(word) for word in host["command"]]
        if "command" in host
        else exec_form(instructions, "CMD")
    )
    assert argv[:3] == [str(BOARD_PYTHON), "-I", "-S"]
    option = dict(zip(argv[4::2], argv[5::2], strict=True))

    board = tmp_path / "b"
    (board / "config" / "custom_components").mkdir(parents=True)
    (board / "config" / "custom_components" / "rockchip_llm").symlink_to(PACKAGE)
    named = tmp_path / "volumes"
    for name in compose["volumes"]:
        (named / name).mkdir(parents=True)
    host_binds = volume_map(host, board, named)
    ha_binds = volume_map(ha, board, named)
    # The board's files: the simulator is its librkllmrt.so, a simulated model,
    # a debugfs with the RKNPU driver's version.
    library_source = host_binds[option["--library"]].source
    assert library_source == Path("/usr/lib/librkllmrt.so")
    host_binds[option["--library"]] = Bind(SIMULATOR, read_only=True)
    debugfs = tmp_path / "debugfs"
    (debugfs / "rknpu").mkdir(parents=True)
    (debugfs / "rknpu" / "version").write_text("RKNPU driver: v0.9.8\n")
    assert host_binds[DEBUGFS] == Bind(Path(DEBUGFS), read_only=True)
    host_binds[DEBUGFS] = Bind(debugfs, read_only=True)
    write_sim_model(host_binds[option["--models"]].source)
    assert host_binds[argv[3]].source == PACKAGE / "host"
    assert host_binds[argv[3]].read_only
    socket = board_path(option["--socket"], host_binds)
    socket.parent.mkdir(parents=True, exist_ok=True)  # Docker creates a missing source
    ha_address = container_path(socket, ha_binds)
    assert ha_address == "/config/rkllm/host.sock"
    assert ha_address in COMPOSE.read_text()
    assert f"`{ha_address}`" in (REPO / "README.md").read_text()

    async with running(
        tmp_path, argv, host_binds, env={"PATH": "/usr/local/bin:/usr/bin:/bin"}
    ) as where:
        assert where == option["--socket"]
        hello = await hello_at(UnixHost(board_path(ha_address, ha_binds)))
    check_hello(hello, option)
    assert hello["board"]["npu_driver_version"] == "RKNPU driver: v0.9.8"
    cache_volume = host_binds[option["--cache"]].source
    assert any((cache_volume / ".runtime").iterdir()), "no private library copy"
