"""What the runtime host's link adds to a worker: a socket pair, a Unix socket, TCP, TLS.

The same zero-delay simulated model runs behind a host reached each way; the host
processes run on this Python. Requests are made on the event loop, as the
integration makes them; the repetitions alternate between the links. TLS is the
host's CLI with --tcp (TLS 1.3, the pairing check, the heartbeat); plain TCP, which
the CLI no longer offers, is the host's own Host served by plain_tcp_host.py (with
the heartbeat), so the difference is what TLS and pairing cost.
"""

import asyncio
from collections.abc import Awaitable, Callable
import contextlib
import functools
from pathlib import Path
import signal
import statistics
import subprocess
import sys
import time

from custom_components.rockchip_llm.host.rkllm.runtime import ModelParams, RunRequest
from custom_components.rockchip_llm.host.server import HostConfig
from custom_components.rockchip_llm.host.wire import MAX_MESSAGE_BYTES
from custom_components.rockchip_llm.link import (
    HOST_FOLDER,
    HostAddress,
    HostLink,
    LocalHost,
    TcpHost,
    UnixHost,
    async_greet,
    async_open,
)
from custom_components.rockchip_llm.remote import RemoteWorker, RuntimeHost

from .results import HandleTimes

HOST_LINKS = ("host_local", "host_unix", "host_tcp", "host_tls")
"""The links measured: HA's own host (socket pair), a Unix socket, plain TCP
loopback and TLS with pairing on loopback."""
HANDSHAKE_LINKS = ("host_unix", "host_tcp", "host_tls")
"""The links whose connection set-up is timed on its own (before the hello)."""
HANDSHAKES = 30
"""Connections opened (and closed) per link to time the set-up."""
PLAIN_TCP_HOST = Path(__file__).with_name("plain_tcp_host.py")


def _start_listening_host(
    command: list[str],
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """Start a host that listens (blocking until it says so).

    Return it and what it printed by name: "listening on", "pairing key".
    """
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdout is not None
    printed: dict[str, str] = {}
    while not (line := process.stdout.readline().decode()).startswith("listening on"):
        assert line, "the host ended before it listened"
        name, _, value = line.strip().rpartition(" ")
        printed[name] = value
    printed["listening on"] = line.removeprefix("listening on").strip()
    return process, printed


async def _async_open_plain_tcp(port: int) -> HostLink:
    """Open a link to the plain TCP host (as TcpHost's, without TLS and pairing)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, limit=MAX_MESSAGE_BYTES
    )
    return HostLink(reader, writer, f"127.0.0.1:{port}", heartbeat=True)


async def _async_handshake_ms(open_link: Callable[[], Awaitable[HostLink]]) -> float:
    """Return the median time to open a link (connect, and TLS with pairing), in ms."""
    times: list[float] = []
    for _ in range(HANDSHAKES):
        started = time.perf_counter()
        link = await open_link()
        times.append((time.perf_counter() - started) * 1000)
        await link.async_close()
    return round(statistics.median(times), 3)


async def _timed_run(worker: RemoteWorker, prompt: str) -> tuple[float, int]:
    pieces: list[str] = []
    started = time.perf_counter()
    result = await worker.run(RunRequest(prompt=prompt), pieces.append)
    wall_ms = (time.perf_counter() - started) * 1000
    return wall_ms, result.perf.generate_tokens if result.perf else len(pieces)


async def _timed_clear(worker: RemoteWorker) -> float:
    started = time.perf_counter()
    await worker.clear_kv_cache(keep_system_prompt=False)
    return (time.perf_counter() - started) * 1000


async def async_measure_host_links(
    library: Path,
    models_dir: Path,
    model: str,
    params: ModelParams,
    *,
    work_dir: Path,
    repetitions: int,
) -> tuple[dict[str, HandleTimes], dict[str, float], dict[str, float]]:
    """Time the calls of measure_handles through a host on each link.

    Return the times per link, each link's connect-and-hello time (ms, once) and
    the median time to set a connection up (ms: connect, TLS and pairing).
    """
    loop = asyncio.get_running_loop()
    socket_path = work_dir / "bench-host.sock"
    host_command = [sys.executable, "-I", "-S", str(HOST_FOLDER)]

    def serving(name: str) -> list[str]:
        cache = work_dir / f"host-cache-{name}"
        return [
            "--library",
            str(library),
            "--models",
            str(models_dir),
            "--cache",
            str(cache),
        ]

    commands = {
        "host_unix": [*host_command, *serving("unix"), "--socket", str(socket_path)],
        "host_tcp": [
            sys.executable,
            "-I",
            "-S",
            str(PLAIN_TCP_HOST),
            str(HOST_FOLDER),
            str(library),
            str(models_dir),
            str(work_dir / "host-cache-tcp"),
        ],
        "host_tls": [
            *host_command,
            *serving("tls"),
            "--tcp",
            "127.0.0.1:0",
            "--state",
            str(work_dir / "host-state"),
        ],
    }
    processes: list[subprocess.Popen[bytes]] = []
    printed: dict[str, dict[str, str]] = {}
    for name, command in commands.items():
        process, printed[name] = await loop.run_in_executor(
            None, _start_listening_host, command
        )
        processes.append(process)
    tcp_port = int(printed["host_tcp"]["listening on"])
    tls_port = int(printed["host_tls"]["listening on"].strip("()").split(", ")[1])
    tls = TcpHost("127.0.0.1", tls_port, pairing_key=printed["host_tls"]["pairing key"])
    addresses: dict[str, HostAddress] = {
        "host_local": LocalHost(
            HostConfig(library, models_dir, work_dir / "host-cache-local"),
            python=sys.executable,
        ),
        "host_unix": UnixHost(socket_path),
        "host_tls": tls,
    }
    openers: dict[str, Callable[[], Awaitable[HostLink]]] = {
        name: functools.partial(async_open, address)
        for name, address in addresses.items()
    }
    openers["host_tcp"] = functools.partial(_async_open_plain_tcp, tcp_port)
    hosts: dict[str, RuntimeHost] = {}
    workers: dict[str, RemoteWorker] = {}
    hello_ms: dict[str, float] = {}
    handshake_ms: dict[str, float] = {}
    times = {name: HandleTimes() for name in HOST_LINKS}
    try:
        for name in HANDSHAKE_LINKS:
            handshake_ms[name] = await _async_handshake_ms(openers[name])
        for name in HOST_LINKS:
            started = time.perf_counter()
            link = await openers[name]()
            hello = await async_greet(link, f"bench {name}")
            hello_ms[name] = round((time.perf_counter() - started) * 1000, 1)
            hosts[name] = RuntimeHost(link, hello)
            workers[name] = await hosts[name].async_open_worker(model, params)
        for index in range(-3, repetitions):
            for name in HOST_LINKS:
                worker, into = workers[name], times[name]
                clear_ms = await _timed_clear(worker)
                short_ms, into.short_tokens = await _timed_run(worker, "short request")
                long_ms, into.long_tokens = await _timed_run(worker, "long request")
                if index >= 0:
                    into.clear_kv_cache.append(clear_ms)
                    into.short_run.append(short_ms)
                    into.long_run.append(long_ms)
    finally:
        for worker in workers.values():
            await worker.async_close()
        for host in hosts.values():
            await host.async_close()
        for process in processes:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await loop.run_in_executor(None, process.wait, 30)
            if process.poll() is None:
                process.kill()
    return times, hello_ms, handshake_ms
