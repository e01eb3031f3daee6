"""Run a command in a root file system of its own, with folders mounted into it.

This stands in for what Docker and systemd do with the runtime host's command: a
private mount namespace (``unshare --mount``, root only) with a tmpfs root that
holds this machine's ``/usr`` (its Debian 12 ``python3``, as in the image) under a
writable overlay, ``/etc`` read-only, ``/proc``, ``/dev`` and ``/sys``, a private
``/tmp``, and the given bind mounts (a volume's source on its target). The mounts
vanish with the namespace when the command ends.
"""

from collections.abc import Mapping
from dataclasses import dataclass
import os
from pathlib import Path
import shlex
import subprocess
from typing import IO

_SYSTEM_LINKS = ("bin", "lib", "lib32", "lib64", "libx32", "sbin")
"""Top-level folders that are symlinks into /usr on a merged-/usr system."""
_API = ("proc", "dev", "sys")
"""The kernel's file systems, shared with the root."""


@dataclass(frozen=True, slots=True)
class Bind:
    """A file or folder of this machine, mounted at a path of the root."""

    source: Path
    read_only: bool = False


def _script(base: Path, binds: Mapping[str, Bind], user: int | None, umask: int) -> str:
    root = base / "root"
    private_tmp = root / "tmp"
    upper, work = base / "usr-upper", base / "usr-work"
    folders = " ".join(
        str(path)
        for path in (upper, work, private_tmp, *(root / name for name in _API))
    )
    lines = [
        "set -eu",
        f"mount -t tmpfs -o mode=0755 isolated-root {base}",
        f"mkdir -p {folders} {root}/usr {root}/etc",
        (
            f"mount -t overlay isolated-usr -o lowerdir=/usr,upperdir={upper},"
            f"workdir={work} {root}/usr"
        ),
        f"mount --bind /etc {root}/etc",
        f"mount -o remount,bind,ro {root}/etc",
        *(f"mount --rbind /{name} {root}/{name}" for name in _API),
        f"mount -t tmpfs -o mode=1777 isolated-tmp {private_tmp}",
    ]
    for name in _SYSTEM_LINKS:
        link = Path("/") / name
        if link.is_symlink():
            lines.append(f"ln -s {shlex.quote(os.readlink(link))} {root}/{name}")
    for target, bind in binds.items():
        inside = shlex.quote(f"{root}{target}")
        if bind.source.is_dir():
            lines.append(f"mkdir -p {inside}")
        else:
            lines.append(f"mkdir -p $(dirname {inside}) && touch {inside}")
        lines.append(f"mount --bind {shlex.quote(str(bind.source))} {inside}")
        if bind.read_only:
            lines.append(f"mount -o remount,bind,ro {inside}")
    spec = "" if user is None else f"--userspec={user}:{user} --groups={user} "
    lines += [f"umask {umask:04o}", f'exec chroot {spec}{root} "$@"']
    return "\n".join(lines)


def start_isolated(
    argv: list[str],
    binds: Mapping[str, Bind],
    base: Path,
    *,
    env: Mapping[str, str],
    stderr: IO[bytes],
    user: int | None = None,
    umask: int = 0o022,
) -> subprocess.Popen[bytes]:
    """Start argv (its own process group) in a root at base with binds at their targets.

    The process gets exactly env; user is a uid (and gid) to run as, root if None.
    """
    base.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _script(base, binds, user, umask),
            "isolated-root",
            "env",
            "-i",
            *(f"{key}={value}" for key, value in env.items()),
            *argv,
        ],
        stdin=subprocess.DEVNULL,
        stdout=stderr,
        stderr=stderr,
        start_new_session=True,
    )
