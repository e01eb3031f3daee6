"""Shared fixtures: the simulator library, simulated model folders, HA glue."""

from collections.abc import Callable
from pathlib import Path
import subprocess

import pytest

from custom_components.rockchip_llm.rkllm.abi import AbiFamily

SIM_DIR = Path(__file__).parent / "rkllm_sim"
SIM_BUILD = SIM_DIR / "build"
SIM_LIBRARIES = {
    AbiFamily.V1_2: SIM_BUILD / "librkllm_sim_1_2.so",
    AbiFamily.V1_3: SIM_BUILD / "librkllm_sim_1_3.so",
}

DEFAULT_REPLIES = (
    "reply user turn on the {name} => "
    '<tool_call>{"name": "HassTurnOn", "arguments": {"name": "{name}"}}</tool_call>',
    "reply user turn off the {name} => "
    '<tool_call>{"name": "HassTurnOff", "arguments": {"name": "{name}"}}</tool_call>',
    "reply tool * => Done.",
    "default => Hello from the simulator.",
)


@pytest.fixture(scope="session", autouse=True)
def build_simulator() -> None:
    """Build the simulator libraries once per session (make is incremental)."""
    subprocess.run(["make", "-s", "-C", str(SIM_DIR)], check=True)


@pytest.fixture(params=list(AbiFamily), ids=lambda family: f"abi{family}")
def abi_family(request: pytest.FixtureRequest) -> AbiFamily:
    """Run a test once per ABI family."""
    family: AbiFamily = request.param
    return family


@pytest.fixture
def sim_library(abi_family: AbiFamily) -> Path:
    """Path of the simulator library of the current ABI family."""
    return SIM_LIBRARIES[abi_family]


def model_text(
    *,
    replies: tuple[str, ...] = DEFAULT_REPLIES,
    max_context_limit: int = 4096,
    prefill_ms_per_token: float = 0,
    decode_ms_per_token: float = 0,
    extra: tuple[str, ...] = (),
) -> str:
    """Return the text of a simulated model file."""
    lines = [
        "RKLLM-SIM 1",
        f"max_context_limit {max_context_limit}",
        f"prefill_ms_per_token {prefill_ms_per_token}",
        f"decode_ms_per_token {decode_ms_per_token}",
        *extra,
        *replies,
    ]
    return "\n".join(lines) + "\n"


type ModelWriter = Callable[..., Path]


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """An empty models directory."""
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def write_model(models_dir: Path) -> ModelWriter:
    """Write a simulated model folder: write_model("Name", **model_text kwargs)."""

    def write(name: str = "Qwen3 Sim", file: str = "model.rkllm", **kwargs: object) -> Path:
        folder = models_dir / name
        folder.mkdir(exist_ok=True)
        path = folder / file
        path.write_text(model_text(**kwargs))  # type: ignore[arg-type]
        return path

    return write


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(request: pytest.FixtureRequest) -> None:
    """Let Home Assistant load custom_components/ in every test that uses hass."""
    if "hass" in request.fixturenames:
        request.getfixturevalue("enable_custom_integrations")
