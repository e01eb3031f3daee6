"""The seam between the two sides: the host package imports nothing of Home Assistant's.

Every module under host/ imports only the standard library and host/ itself, and
the host starts on the machine's own Python 3.11 in isolated mode (``-I -S``)
through its folder's ``__main__.py``, also from a copy of the folder alone.
"""

import ast
from pathlib import Path
import shutil
import subprocess

import pytest

from custom_components.rockchip_llm.host.version import HOST_VERSION

from .host_process import HOST_FOLDER, host_python

HOST_MODULES = sorted(
    path for path in HOST_FOLDER.rglob("*.py") if "__pycache__" not in path.parts
)


def _imports(path: Path) -> list[tuple[str, int]]:
    """The modules a file imports: (absolute name or relative tail, level)."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def _imports_guarded_by_import_error(path: Path) -> set[str]:
    """The modules a file imports inside a try that catches ImportError."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Try) and any(
            isinstance(handler.type, ast.Name) and handler.type.id == "ImportError"
            for handler in node.handlers
        ):
            found |= {
                alias.name
                for statement in node.body
                if isinstance(statement, ast.Import)
                for alias in statement.names
            }
    return found


@pytest.fixture(scope="module")
def stdlib_names() -> set[str]:
    """The standard library of the host's Python."""
    names = subprocess.run(
        [
            host_python(),
            "-I",
            "-S",
            "-c",
            "import sys; print(*sys.stdlib_module_names)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return set(names)


def test_the_host_has_modules() -> None:
    """The scan below sees the host's package and its subpackage."""
    names = {str(path.relative_to(HOST_FOLDER)) for path in HOST_MODULES}
    assert {"__main__.py", "server.py", "wire.py", "rkllm/worker.py"} <= names


OUTSIDE_STDLIB = {
    ("rkllm/child.py", "coverage"),
    ("announce.py", "zeroconf"),
}
"""The imports that are not the standard library's: child.start_coverage's (a
development tool) and the announcement's (optional: no zeroconf, no discovery)."""


@pytest.mark.parametrize(
    "path", HOST_MODULES, ids=[str(p.relative_to(HOST_FOLDER)) for p in HOST_MODULES]
)
def test_a_host_module_imports_only_the_stdlib_and_the_host(
    path: Path, stdlib_names: set[str]
) -> None:
    """No homeassistant, no custom_components, no relative import above host/."""
    depth = len(path.relative_to(HOST_FOLDER).parts)  # levels up to host/ itself
    for module, level in _imports(path):
        if level:
            assert level <= depth, (
                f"{path.name}: from {'.' * level}{module} leaves host/"
            )
            continue
        top = module.split(".")[0]
        assert top not in ("homeassistant", "custom_components"), (
            f"{path.name}: {module}"
        )
        if (str(path.relative_to(HOST_FOLDER)), top) in OUTSIDE_STDLIB:
            # Looked for only when wanted; the host runs without it.
            assert module in _imports_guarded_by_import_error(path), (
                f"{path.name}: {module} is imported without an except ImportError"
            )
            continue
        assert top in stdlib_names, f"{path.name}: {module} is not in Python's stdlib"


_IMPORT_ALL = """
import pathlib, runpy, sys
folder = pathlib.Path(sys.argv[1])
sys.argv = [str(folder), "--help"]
try:
    runpy.run_path(str(folder), run_name="__main__")
except SystemExit as done:
    assert done.code == 0, done.code
import importlib
for path in sorted(folder.rglob("*.py")):
    parts = path.relative_to(folder).with_suffix("").parts
    if parts[-1] in ("__init__", "__main__"):
        parts = parts[:-1]
    if parts:
        importlib.import_module(".".join(("rockchip_llm_host", *parts)))
foreign = sorted(
    name for name in sys.modules
    if name.split(".")[0] in ("homeassistant", "custom_components")
)
assert not foreign, foreign
outside = sorted(
    name for name, module in sys.modules.items()
    if name.startswith("rockchip_llm_host")
    and not pathlib.Path(module.__file__).is_relative_to(folder)
)
assert not outside, outside
print("imported", *sorted(n for n in sys.modules if n.startswith("rockchip_llm_host")))
"""


@pytest.mark.parametrize("where", ["in-place", "copied"])
def test_every_host_module_imports_on_python_311(tmp_path: Path, where: str) -> None:
    """Through __main__.py's bootstrap, on the host's Python, isolated (-I -S)."""
    folder = HOST_FOLDER
    if where == "copied":  # the folder alone, as copied to a board
        folder = tmp_path / "host"
        shutil.copytree(
            HOST_FOLDER, folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    done = subprocess.run(
        [host_python(), "-I", "-S", "-W", "error", "-c", _IMPORT_ALL, str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "usage: rockchip-llm-host" in done.stdout
    imported = set(done.stdout.rsplit("imported", 1)[1].split())
    assert imported == {_module_name(path) for path in HOST_MODULES}


def _module_name(path: Path) -> str:
    """A host module's name in the host's own process (__main__ is the package's)."""
    parts = path.relative_to(HOST_FOLDER).with_suffix("").parts
    if parts[-1] in ("__init__", "__main__"):
        parts = parts[:-1]
    return ".".join(("rockchip_llm_host", *parts))


def _host_command(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python3 -I -S <host folder> <args>`` on the host's Python."""
    return subprocess.run(
        [host_python(), "-I", "-S", str(HOST_FOLDER), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def test_the_cli_help_runs_on_python_311(tmp_path: Path) -> None:
    """``python3 -I -S <host folder> --help`` as the README has users run it."""
    done = _host_command("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: rockchip-llm-host")
    for option in ("--models", "--cache", "--library", "--socket", "--tcp"):
        assert option in done.stdout
    assert done.stderr == ""
    version = _host_command("--version", cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == HOST_VERSION
