"""Child Python processes that run only the binding modules of this folder.

A child is ``python -I -S -c <bootstrap> <this folder> <module> <args...>``. The
bootstrap imports this folder as a package of a private name and calls
``<module>._child_main(args)``, so the child never imports
``custom_components/rockchip_llm/__init__.py`` and with it Home Assistant.
When its parent is measured by coverage, so is the child (:func:`start_coverage`).
"""

import os
from pathlib import Path
import signal
import sys
import sysconfig
from typing import Final

_PACKAGE_DIR: Final = Path(__file__).resolve().parent
_CHILD_PACKAGE: Final = "_rockchip_llm_child_rkllm"
_BOOTSTRAP: Final = f"""\
import importlib, importlib.util, os, sys
folder, module = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location(
    {_CHILD_PACKAGE!r},
    os.path.join(folder, "__init__.py"),
    submodule_search_locations=[folder],
)
package = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = package
spec.loader.exec_module(package)
importlib.import_module({_CHILD_PACKAGE!r} + ".child").start_coverage()
main = importlib.import_module({_CHILD_PACKAGE!r} + "." + module)._child_main
sys.exit(main(sys.argv[3:]))
"""


def child_command(module: str, *args: str) -> list[str]:
    """Return the command of a child that runs module's _child_main(args)."""
    return [
        sys.executable,
        "-I",
        "-S",
        "-c",
        _BOOTSTRAP,
        str(_PACKAGE_DIR),
        module,
        *args,
    ]


COVERAGE_PATH_ENV: Final = "ROCKCHIP_LLM_COVERAGE_PATH"


def start_coverage() -> None:  # pragma: no cover - runs before coverage does
    """Measure this child process when its parent asks coverage to measure children.

    Coverage measures subprocesses through a .pth file and an environment variable
    (its ``patch = subprocess``), but a child runs with -I -S: no .pth file is read
    and site-packages is not on the path. When the variable is set and coverage is
    installed, it is imported from site-packages (only it) and started. Call this
    first in a child's bootstrap; without the variable it does nothing.
    """
    if not (
        os.environ.get("COVERAGE_PROCESS_CONFIG")
        or os.environ.get("COVERAGE_PROCESS_START")
    ):
        return
    # The runtime host may run on another Python than the tests' (the board's):
    # ROCKCHIP_LLM_COVERAGE_PATH then names a folder with coverage for it.
    site_packages = os.environ.get(COVERAGE_PATH_ENV) or sysconfig.get_path("purelib")
    sys.path.append(site_packages)
    try:
        import coverage  # noqa: PLC0415 - a development tool, only when asked for
    except ImportError:
        return
    finally:
        sys.path.remove(site_packages)
    coverage.process_startup()


def exit_description(returncode: int) -> str:
    """Describe how a process ended: 'SIGSEGV' or 'exit status 3'."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


def disable_core_dumps() -> None:
    """Keep a crashing child from writing a core file (call in the child)."""
    try:
        import resource  # noqa: PLC0415 - POSIX only, and only needed in a child

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, OSError, ValueError):
        pass
