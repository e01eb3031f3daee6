"""What the runtime host's link adds to a worker: a socket pair, a Unix socket, TCP.

The same zero-delay simulated model runs behind a host reached each way; the host
processes run on this Python. Requests are made on the event loop, as the
integration makes them; the repetitions alternate between the links.
"""

import asyncio
import contextlib
from pathlib import Path
import signal
import socket
import subprocess
import sys
import time

from custom_components.rockchip_llm.host.rkllm.runtime import ModelParams, RunRequest
from custom_components.rockchip_llm.host.server import HostConfig
from custom_components.rockchip_llm.link import (
    HOST_FOLDER,
    HostAddress,
    LocalHost,
    TcpHost,
    UnixHost,
    async_connect,
)
from custom_components.rockchip_llm.remote import RemoteWorker, RuntimeHost

from .results import HandleTimes

HOST_LINKS = ("host_local", "host_unix", "host_tcp")
"""The links measured: HA's own host (socket pair), a Unix socket, TCP loopback."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_listening_host(
    library: Path, models_dir: Path, cache_dir: Path, listen: list[str]
) -> subprocess.Popen[bytes]:
    """Start a host that listens (blocking until it says so)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-S",
            str(HOST_FOLDER),
            "--library",
            str(library),
            "--models",
            str(models_dir),
            "--cache",
            str(cache_dir),
            *listen,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith(b"listening on"), line
    return process


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
) -> tuple[dict[str, HandleTimes], dict[str, float]]:
    """Time the calls of measure_handles through a host on each link.

    Return the times per link and each link's connect-and-hello time (ms).
    """
    loop = asyncio.get_running_loop()
    socket_path = work_dir / "bench-host.sock"
    port = await loop.run_in_executor(None, _free_port)
    processes = [
        await loop.run_in_executor(
            None,
            _start_listening_host,
            library,
            models_dir,
            work_dir / f"host-cache-{name}",
            listen,
        )
        for name, listen in (
            ("unix", ["--socket", str(socket_path)]),
            ("tcp", ["--tcp", f"127.0.0.1:{port}"]),
        )
    ]
    addresses: dict[str, HostAddress] = {
        "host_local": LocalHost(
            HostConfig(library, models_dir, work_dir / "host-cache-local"),
            python=sys.executable,
        ),
        "host_unix": UnixHost(socket_path),
        "host_tcp": TcpHost("127.0.0.1", port),
    }
    hosts: dict[str, RuntimeHost] = {}
    workers: dict[str, RemoteWorker] = {}
    hello_ms: dict[str, float] = {}
    times = {name: HandleTimes() for name in HOST_LINKS}
    try:
        for name in HOST_LINKS:
            started = time.perf_counter()
            link, hello = await async_connect(addresses[name], f"bench {name}")
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
    return times, hello_ms
