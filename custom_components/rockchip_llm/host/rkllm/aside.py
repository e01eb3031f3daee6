"""What the host moved out of its way, kept for a while and then removed.

A folder, FIFO or damaged file where one of the host's own files belongs is
renamed to ``<name>.moved-<random hex>`` next to it (someone may want to look at
it) and logged. Only the newest few of a folder stay: each move removes the
oldest beyond that, so they never pile up. Everything here blocks.
"""

import logging
from pathlib import Path
import re
import secrets
import shutil
import stat
from typing import Final

_LOGGER = logging.getLogger(__name__)

KEEP: Final = 3
"""Moved-aside entries kept per folder, the most recent ones."""
_MOVED: Final = re.compile(r".+\.moved-[0-9a-f]{1,16}")


def move_aside(path: Path) -> Path:
    """Rename path to a visible name next to it; prune the folder; return the new path."""
    target = path.with_name(f"{path.name}.moved-{secrets.token_hex(4)}")
    path.rename(target)
    prune(path.parent)
    return target


def prune(folder: Path, keep: int = KEEP) -> None:
    """Remove the oldest moved-aside entries of folder beyond keep.

    Their age is when they were moved (a rename sets the status change time).
    """
    moved: list[tuple[int, Path]] = []
    try:
        entries = list(folder.iterdir())
    except OSError as err:
        _LOGGER.debug("Cannot list %s: %s", folder, err)
        return
    for entry in entries:
        if not _MOVED.fullmatch(entry.name):
            continue
        try:
            moved.append((entry.lstat().st_ctime_ns, entry))
        except OSError:
            continue
    moved.sort()
    for _moved_at, entry in moved[: max(len(moved) - keep, 0)]:
        try:
            if stat.S_ISDIR(entry.lstat().st_mode):
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as err:
            _LOGGER.warning("Cannot remove %s (moved aside earlier): %s", entry, err)
        else:
            _LOGGER.info("Removed %s, moved aside earlier", entry)
