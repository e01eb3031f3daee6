"""Child processes (python -I -S) are measured by coverage when their parent asks."""

import inspect
import os
from pathlib import Path
import subprocess

import coverage

from custom_components.rockchip_llm.host.rkllm import probe
from custom_components.rockchip_llm.host.rkllm.child import child_command

from .conftest import PACKAGE


def run_probe(sim_library: Path, tmp_path: Path, **env: str) -> None:
    """Run the library-probe child with env on top of ours, minus coverage's own."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    done = subprocess.run(
        child_command("probe", str(sim_library)),
        env={**base, **env},
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_child_is_measured_when_asked(sim_library: Path, tmp_path: Path) -> None:
    """COVERAGE_PROCESS_START names a config: the child's own lines are recorded."""
    data_file = tmp_path / "data" / ".coverage"
    config = tmp_path / "coverage.ini"
    config.write_text(
        f"[run]\nsource = {PACKAGE}\nparallel = true\ndata_file = {data_file}\n"
    )
    run_probe(sim_library, tmp_path, COVERAGE_PROCESS_START=str(config))

    combined = coverage.Coverage(data_file=str(data_file), config_file=str(config))
    combined.combine([str(data_file.parent)])
    measured = set(combined.get_data().lines(str(Path(probe.__file__))) or ())
    lines, start = inspect.getsourcelines(probe._child_main)
    ends = {  # its first and last statements
        start + offset
        for offset, line in enumerate(lines)
        if line.strip().startswith(("verdict_fd = ", "out.write("))
    }
    assert len(ends) == 2
    assert ends <= measured


def test_child_is_not_measured_otherwise(sim_library: Path, tmp_path: Path) -> None:
    """Without the variable the child writes no coverage data."""
    run_probe(sim_library, tmp_path)
    assert not list(tmp_path.glob(".coverage*"))
