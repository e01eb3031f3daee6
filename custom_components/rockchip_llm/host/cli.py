"""The runtime host's command line: where it listens and what it serves."""

import argparse
import asyncio
import contextlib
import logging
import os
from pathlib import Path
import signal
import socket
import stat
import sys
from typing import Final

from . import board
from .address import parse_tcp_address
from .announce import Announcer
from .identity import HostIdentity, IdentityError, default_state_dir, load_or_create
from .rkllm.abi import AbiFamily
from .server import Host, HostConfig
from .tcp_server import TcpServer
from .version import DEFAULT_PORT, HOST_VERSION
from .wire import MAX_MESSAGE_BYTES

_LOGGER = logging.getLogger(__name__)

SOCKET_MODE: Final = 0o660
"""The socket file: owner and group may connect, others not (never world-writable)."""
LOCAL_ONLY: Final = "127.0.0.1"
"""Where --tcp listens unless given an address: this machine only."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rockchip-llm-host",
        description=(
            "The Rockchip LLM runtime host: runs the RKLLM runtime, the models and "
            "their prompt caches for one Home Assistant."
        ),
    )
    parser.add_argument(
        "--library",
        type=Path,
        default=Path("/usr/lib/librkllmrt.so"),
        help="the RKLLM runtime library (default: %(default)s)",
    )
    parser.add_argument(
        "--models",
        type=Path,
        required=True,
        help="the models folder: <models>/<model name>/<file>.rkllm",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        required=True,
        help="the folder of the prompt caches (and the library's private copy)",
    )
    parser.add_argument(
        "--cache-budget-mb",
        type=float,
        default=2048,
        help="most disk space the prompt caches may take (default: %(default)s)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="seconds an answer may go without new text before it is stopped",
    )
    parser.add_argument(
        "--abi-family",
        choices=[str(family) for family in AbiFamily],
        help="only for a runtime library that cannot be identified",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--socket", type=Path, help="listen on this Unix socket (created, mode 660)"
    )
    where.add_argument(
        "--tcp",
        type=parse_tcp_address,
        nargs="?",
        const=(LOCAL_ONLY, DEFAULT_PORT),
        metavar="ADDRESS[:PORT]",
        help=(
            f"listen on TCP, with TLS and the pairing key: {LOCAL_ONLY} unless given "
            f"(0.0.0.0: every network), port {DEFAULT_PORT} unless given"
        ),
    )
    where.add_argument(
        "--fd",
        type=int,
        help=argparse.SUPPRESS,  # a connected socket from the process that started it
    )
    parser.add_argument(
        "--state",
        type=Path,
        help=(
            "with --tcp: the folder of the host's certificate, private key and "
            "pairing key, made at the first start (default: $STATE_DIRECTORY under "
            "systemd, else ~/.local/state/rockchip-llm)"
        ),
    )
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=HOST_VERSION)
    return parser


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by an earlier host; refuse to touch anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SystemExit(f"{path} exists and is not a socket; refusing to replace it")
    path.unlink()


async def async_serve_socket(sock: socket.socket, host: Host) -> None:
    """Serve the one client at the other end of a connected socket, then stop."""
    reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_MESSAGE_BYTES)
    try:
        await host.async_serve(reader, writer)
    finally:
        await host.async_close()


def _load_identity(state_dir: Path) -> HostIdentity:
    """Read (at the first start: make) the identity; tell it on the console and log."""
    identity, made = load_or_create(state_dir)
    if made:
        _LOGGER.info("Made a new %s in %s", " and ".join(made), state_dir)
    _LOGGER.info("Identity %s", identity.identity)
    _LOGGER.info(
        "Pairing key %s (in %s/%s)",
        identity.pairing_key_text,
        state_dir,
        identity.pairing_key_file.name,
    )
    print(f"identity {identity.identity}", flush=True)  # noqa: T201
    print(f"pairing key {identity.pairing_key_text}", flush=True)  # noqa: T201
    return identity


async def _async_announce(identity: HostIdentity, server: asyncio.Server) -> Announcer:
    """Announce a TCP host on the LAN where it can be (logged when not)."""
    facts = await asyncio.get_running_loop().run_in_executor(None, board.read_host_info)
    announcer = Announcer(
        identity.identity, board.board_name(board.hostname(), facts["soc"])
    )
    await announcer.async_start([sock.getsockname() for sock in server.sockets])
    return announcer


async def _serve(
    args: argparse.Namespace, host: Host, identity: HostIdentity | None
) -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    if args.fd is not None:
        served = asyncio.create_task(
            async_serve_socket(socket.socket(fileno=args.fd), host)
        )
        waiting = asyncio.create_task(stopped.wait())
        await asyncio.wait({served, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not served.done():
            served.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await served
        await host.async_close()
        return
    if args.socket is not None:
        _remove_stale_socket(args.socket)
        old_umask = os.umask(0o117)  # the socket is born mode 660
        try:
            server = await asyncio.start_unix_server(
                host.async_serve, path=str(args.socket), limit=MAX_MESSAGE_BYTES
            )
        finally:
            os.umask(old_umask)
        args.socket.chmod(SOCKET_MODE)
        where = str(args.socket)
    else:
        assert identity is not None
        address, port = args.tcp
        server = await asyncio.start_server(
            TcpServer(host, identity).async_serve,
            address,
            port,
            limit=MAX_MESSAGE_BYTES,
        )
        where = ", ".join(str(sock.getsockname()) for sock in server.sockets or ())
    _LOGGER.info("Rockchip LLM runtime host %s listening on %s", HOST_VERSION, where)
    print(f"listening on {where}", flush=True)  # noqa: T201 - for whoever started it
    announcer = (
        await _async_announce(identity, server) if identity is not None else None
    )
    async with server:
        await stopped.wait()
        if announcer is not None:
            await announcer.async_close()
        server.close()
        await host.async_close()
    if args.socket is not None:
        with contextlib.suppress(OSError):
            args.socket.unlink()


def main(argv: list[str]) -> int:
    """Run the host until it is stopped (SIGTERM, SIGINT) or its one link ends."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = HostConfig(
        library=args.library,
        models_dir=args.models,
        cache_dir=args.cache,
        cache_budget_bytes=round(args.cache_budget_mb * 1_000_000),
        abi_family=AbiFamily(args.abi_family) if args.abi_family else None,
        stall_timeout=args.stall_timeout,
    )
    try:
        identity = (
            _load_identity(args.state or default_state_dir())
            if args.tcp is not None
            else None
        )
        asyncio.run(_serve(args, Host(config), identity))
    except IdentityError as err:
        _LOGGER.error("Cannot start: %s", err)
        raise SystemExit(1) from None
    return 0
