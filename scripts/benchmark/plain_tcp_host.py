"""A runtime host on plain TCP, for the bench's baseline only (the CLI has none).

``python3 -I -S plain_tcp_host.py <host folder> <library> <models> <cache>``: the
host's own Host, served with asyncio.start_server on 127.0.0.1 (a free port) with
the heartbeat of a TCP link, without TLS or pairing; prints ``listening on <port>``
and runs until SIGTERM. Loaded as the host's __main__ loads it (its package under a
private name), so it imports nothing of Home Assistant.
"""

import asyncio
import functools
import importlib
import importlib.util
from pathlib import Path
import signal
import sys
from types import ModuleType


def _host_modules(folder: Path) -> tuple[ModuleType, ModuleType]:
    spec = importlib.util.spec_from_file_location(
        "rockchip_llm_host",
        folder / "__init__.py",
        submodule_search_locations=[str(folder)],
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return (
        importlib.import_module(f"{spec.name}.server"),
        importlib.import_module(f"{spec.name}.wire"),
    )


async def _serve(folder: Path, library: Path, models: Path, cache: Path) -> None:
    server_module, wire = _host_modules(folder)
    host = server_module.Host(server_module.HostConfig(library, models, cache))
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    server = await asyncio.start_server(
        functools.partial(host.async_serve, heartbeat=True),
        "127.0.0.1",
        0,
        limit=wire.MAX_MESSAGE_BYTES,
    )
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)  # noqa: T201
    async with server:
        await stopped.wait()
        server.close()
        await host.async_close()


if __name__ == "__main__":
    asyncio.run(_serve(*(Path(argument) for argument in sys.argv[1:5])))
