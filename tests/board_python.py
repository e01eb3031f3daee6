"""The board's Python on this machine, and what scripts/setup installed for it.

No pytest here: the tests and the scripts (scripts/check-lan) share it.
"""

import os
from pathlib import Path
import shutil
import subprocess

SETUP_CACHE = Path(
    os.environ.get("ROCKCHIP_LLM_CACHE") or Path.home() / ".cache/rockchip-llm"
)
"""Where scripts/setup keeps what it installs."""


def find_host_python() -> str | None:
    """The board-like Python the runtime host runs on: 3.11 to 3.13, None if none.

    Debian 12 and Armbian bookworm boards have 3.11; the machine's own python3 is
    such an interpreter. ROCKCHIP_LLM_TEST_HOST_PYTHON names another one.
    """
    candidates = [
        os.environ.get("ROCKCHIP_LLM_TEST_HOST_PYTHON"),
        shutil.which("python3.11"),
        shutil.which("python3"),
        "/usr/bin/python3",
    ]
    for candidate in filter(None, candidates):
        version = subprocess.run(
            [candidate, "-I", "-S", "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if version in ("(3, 11)", "(3, 12)", "(3, 13)"):
            return candidate
    return None


def setup_folder(kind: str, python: str) -> Path:
    """The folder scripts/setup installs a package into for python ("zeroconf")."""
    version = subprocess.run(
        [python, "-I", "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return SETUP_CACHE / f"host-{kind}-{version}"
