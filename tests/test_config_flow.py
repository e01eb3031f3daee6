"""The config flow: runtime entry, first agent, reconfigure and agent subentries."""

from collections.abc import Generator
from pathlib import Path
import re
import shutil
import struct
from typing import Any
from unittest.mock import AsyncMock, patch

import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry
import voluptuous as vol

from custom_components.rockchip_llm import config_flow
from custom_components.rockchip_llm.const import (
    ABI_FAMILY_AUTO,
    AGENT_OPTION_DEFAULTS,
    CONF_ABI_FAMILY,
    CONF_CACHE_BUDGET,
    CONF_CACHE_DIR,
    CONF_ENABLE_THINKING,
    CONF_HISTORY_STRATEGY,
    CONF_LIBRARY_PATH,
    CONF_MAX_CONTEXT_LEN,
    CONF_MAX_HISTORY,
    CONF_MAX_NEW_TOKENS,
    CONF_MODEL,
    CONF_MODELS_DIR,
    CONF_PROMPT,
    CONF_REPEAT_PENALTY,
    CONF_STALL_TIMEOUT,
    CONF_TEMPERATURE,
    CONF_TOOL_GROUPS,
    CONF_TOP_K,
    CONF_TOP_P,
    DEFAULT_CACHE_BUDGET_MB,
    DEFAULT_PROMPT_FILE,
    DEFAULT_STALL_TIMEOUT_S,
    DOMAIN,
    SUBENTRY_AI_TASK,
    SUBENTRY_CONVERSATION,
)
from custom_components.rockchip_llm.host import prompt_cache
from custom_components.rockchip_llm.host.model_files import scan_models
from custom_components.rockchip_llm.host.rkllm.abi import AbiFamily
from custom_components.rockchip_llm.simulation import SIMULATOR_ENV
from custom_components.rockchip_llm.tool_groups import ToolGroup
from homeassistant import config_entries
from homeassistant.const import CONF_LLM_HASS_API, CONF_NAME
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import llm
from homeassistant.setup import async_setup_component

from .conftest import SIM_BUILD, SIM_LIBRARIES, ModelWriter

SIM_LIBRARY = SIM_LIBRARIES[AbiFamily.V1_3]
DEFAULT_PROMPT = DEFAULT_PROMPT_FILE.read_text(encoding="utf-8")
DEFAULT_OPTIONS = {
    CONF_PROMPT: DEFAULT_PROMPT,
    CONF_LLM_HASS_API: [llm.LLM_API_ASSIST],
    **AGENT_OPTION_DEFAULTS,
}
AGENT_INPUT = {
    CONF_MODEL: "Beta",
    CONF_PROMPT: "You are a pirate.",
    CONF_LLM_HASS_API: [llm.LLM_API_ASSIST],
    CONF_MAX_CONTEXT_LEN: 2048.0,
    CONF_MAX_NEW_TOKENS: 128.0,
    CONF_TEMPERATURE: 0.3,
    CONF_TOP_K: 5.0,
    CONF_TOP_P: 0.9,
    CONF_REPEAT_PENALTY: 1.2,
    CONF_ENABLE_THINKING: True,
    CONF_MAX_HISTORY: 0.0,
    CONF_HISTORY_STRATEGY: "prompt_cache_only",
}
AGENT_DATA = {
    **AGENT_INPUT,
    CONF_MAX_CONTEXT_LEN: 2048,
    CONF_MAX_NEW_TOKENS: 128,
    CONF_TOP_K: 5,
    CONF_MAX_HISTORY: 0,
}

ALL_TOOL_GROUPS = [group.value for group in ToolGroup]


def elf_header(machine: int) -> bytes:
    """Return a minimal little-endian 64-bit ELF header of a shared library."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHI", 3, machine, 1) + bytes(40)


def schema_values(result: dict[str, Any], kind: str) -> dict[str, Any]:
    """Return the suggested values ("suggested_value") or defaults ("default") of a form."""
    schema: vol.Schema = result["data_schema"]
    values: dict[str, Any] = {}
    for key in schema.schema:
        if kind == "default" and key.default is not vol.UNDEFINED:
            values[str(key)] = key.default()
        elif kind == "suggested_value" and key.description:
            values[str(key)] = key.description["suggested_value"]
    return values


def select_options(result: dict[str, Any], field: str) -> list[Any]:
    """Return the options of a select field of a form."""
    schema: vol.Schema = result["data_schema"]
    selector = next(value for key, value in schema.schema.items() if key == field)
    return list(selector.config["options"])


@pytest.fixture(autouse=True)
async def setup_homeassistant(hass: HomeAssistant) -> None:
    """Set up the core integration that conversation, our dependency, needs."""
    assert await async_setup_component(hass, "homeassistant", {})


@pytest.fixture(autouse=True)
def config_dir(hass: HomeAssistant, tmp_path: Path) -> Path:
    """Use an empty configuration folder of our own."""
    path = tmp_path / "config"
    path.mkdir()
    hass.config.config_dir = str(path)
    return path


@pytest.fixture
def mock_setup_entry() -> Generator[AsyncMock]:
    """Keep the flow tests about the flow: entry setup and unload always succeed."""
    with (
        patch(
            "custom_components.rockchip_llm.async_setup_entry", return_value=True
        ) as mock,
        patch("custom_components.rockchip_llm.async_unload_entry", return_value=True),
    ):
        yield mock


@pytest.fixture
def paths(tmp_path: Path, models_dir: Path, write_model: ModelWriter) -> dict[str, str]:
    """Valid user input: the simulator library and a models folder with one model."""
    write_model("Qwen3 Sim")
    return {
        CONF_LIBRARY_PATH: str(SIM_LIBRARY),
        CONF_MODELS_DIR: str(models_dir),
        CONF_CACHE_DIR: str(tmp_path / "cache"),
        CONF_CACHE_BUDGET: 2048,
        CONF_STALL_TIMEOUT: 30,
    }


@pytest.fixture
def entry(hass: HomeAssistant, paths: dict[str, str]) -> MockConfigEntry:
    """A configured runtime with one agent, not set up."""
    entry = MockConfigEntry(
        domain=DOMAIN,
        title="Rockchip LLM",
        data=paths,
        subentries_data=[
            config_entries.ConfigSubentryData(
                subentry_type=SUBENTRY_CONVERSATION,
                data={CONF_MODEL: "Qwen3 Sim", **DEFAULT_OPTIONS},
                title="Qwen3 Sim",
                unique_id=None,
            )
        ],
    )
    entry.add_to_hass(hass)
    return entry


@pytest.fixture
async def loaded_entry(
    hass: HomeAssistant, entry: MockConfigEntry, write_model: ModelWriter
) -> MockConfigEntry:
    """The runtime entry, loaded (its host started), with a second model on disk."""
    write_model("Beta")
    assert await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is config_entries.ConfigEntryState.LOADED
    return entry


async def start_user_flow(hass: HomeAssistant, step: str = "local") -> dict[str, Any]:
    """Start the config flow of a runtime on this machine; step is the form it shows."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": config_entries.SOURCE_USER}
    )
    assert result["type"] is FlowResultType.MENU
    assert result["step_id"] == "user"
    assert result["menu_options"] == ["local", "host"]
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "local"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == step
    return dict(result)


async def submit_paths(
    hass: HomeAssistant, user_input: dict[str, str]
) -> dict[str, Any]:
    """Start the config flow and submit the paths."""
    result = await start_user_flow(hass)
    return dict(
        await hass.config_entries.flow.async_configure(result["flow_id"], user_input)
    )


async def test_full_flow(
    hass: HomeAssistant,
    sim_library: Path,
    paths: dict[str, str],
    write_model: ModelWriter,
    mock_setup_entry: AsyncMock,
) -> None:
    """Paths, then a model: the entry is created with one agent on that model."""
    write_model("Beta").write_bytes(b"x" * 1_500_000)  # only its size matters here
    paths[CONF_LIBRARY_PATH] = str(sim_library)

    result = await submit_paths(hass, paths)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "model"
    assert schema_values(result, "default") == {CONF_MODEL: "Beta"}
    # The step names the runtime it found: here the simulator, and says so.
    facts = result["description_placeholders"]
    assert re.fullmatch(
        r"1\.[23]\.\d \(the simulator, no NPU\)", facts["runtime_version"]
    )
    # The simulator's model files are tiny text files: no size, but the truth.
    options = select_options(result, CONF_MODEL)
    assert options == [
        {"value": "Beta", "label": "Beta (simulated)"},
        {"value": "Qwen3 Sim", "label": "Qwen3 Sim (simulated)"},
    ]

    result = dict(
        await hass.config_entries.flow.async_configure(
            result["flow_id"], {CONF_MODEL: "Qwen3 Sim"}
        )
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "Rockchip LLM"
    assert result["data"] == paths
    entry = result["result"]
    assert entry.version == 1
    (subentry,) = entry.subentries.values()
    assert subentry.subentry_type == SUBENTRY_CONVERSATION
    assert subentry.title == "Qwen3 Sim Conversation"
    assert subentry.unique_id is None
    assert dict(subentry.data) == {CONF_MODEL: "Qwen3 Sim", **DEFAULT_OPTIONS}
    # The cache folder was created, the write probe removed; the host checked the
    # library and keeps its private copy there.
    assert [path.name for path in Path(paths[CONF_CACHE_DIR]).iterdir()] == [".runtime"]
    assert len(mock_setup_entry.mock_calls) == 1


def test_format_size() -> None:
    """Sizes show in GB from one GB on, in MB below."""
    assert config_flow._format_size(1_234_000_000) == "1.2 GB"
    assert config_flow._format_size(999_000_000) == "999.0 MB"


async def test_model_labels(
    hass: HomeAssistant, models_dir: Path, write_model: ModelWriter
) -> None:
    """Real models are labelled with their size, simulated ones as simulated."""
    write_model("Beta").write_bytes(b"x" * 1_500_000)
    models = (await hass.async_add_executor_job(scan_models, models_dir)).models
    real = config_flow.model_selector(models, simulated=False)
    assert real.config["options"] == [{"value": "Beta", "label": "Beta (1.5 MB)"}]
    simulated = config_flow.model_selector(models, simulated=True)
    assert simulated.config["options"] == [
        {"value": "Beta", "label": "Beta (simulated)"}
    ]
    # A folder whose name already says so is not labelled twice.
    demo = {"Demo (SIMULATED)": models["Beta"]}
    assert config_flow.model_selector(demo, simulated=True).config["options"] == [
        {"value": "Demo (SIMULATED)", "label": "Demo (SIMULATED)"}
    ]


async def test_user_form_defaults(
    hass: HomeAssistant,
    config_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without any library, the configuration folder is suggested; the folders default there."""
    monkeypatch.delenv(SIMULATOR_ENV, raising=False)
    with patch.object(config_flow, "LIBRARY_CANDIDATES", (tmp_path / "missing.so",)):
        result = await start_user_flow(hass)
    assert result["errors"] == {}
    assert schema_values(result, "suggested_value") == {
        CONF_LIBRARY_PATH: str(config_dir / "rkllm" / "librkllmrt.so")
    }
    assert schema_values(result, "default") == {
        CONF_MODELS_DIR: str(config_dir / "rkllm" / "models"),
        CONF_CACHE_DIR: str(config_dir / "rkllm" / "cache"),
        CONF_CACHE_BUDGET: DEFAULT_CACHE_BUDGET_MB,
        CONF_STALL_TIMEOUT: DEFAULT_STALL_TIMEOUT_S,
        CONF_ABI_FAMILY: ABI_FAMILY_AUTO,  # the field shows "Automatic"
    }


@pytest.mark.parametrize(
    ("candidates", "expected"),
    [
        (("missing.so", "second.so"), "second.so"),
        (("first.so", "second.so"), "first.so"),
        (("missing.so",), "config/rkllm/librkllmrt.so"),
    ],
)
async def test_suggested_library(
    hass: HomeAssistant,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    candidates: tuple[str, ...],
    expected: str,
) -> None:
    """The first existing candidate is suggested, then the configuration folder."""
    monkeypatch.setenv(SIMULATOR_ENV, str(SIM_LIBRARY))
    for name in ("first.so", "second.so", "config/rkllm/librkllmrt.so"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with patch.object(
        config_flow, "LIBRARY_CANDIDATES", tuple(tmp_path / name for name in candidates)
    ):
        result = await start_user_flow(hass)
    assert schema_values(result, "suggested_value") == {
        CONF_LIBRARY_PATH: str(tmp_path / expected)
    }


@pytest.mark.parametrize("simulator", [True, False])
async def test_suggested_simulator(
    hass: HomeAssistant,
    config_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    simulator: bool,
) -> None:
    """Without a runtime, ROCKCHIP_LLM_SIMULATOR is suggested when it names a file."""
    monkeypatch.setenv(
        SIMULATOR_ENV,
        str(SIM_LIBRARY if simulator else tmp_path / "none.so"),
    )
    with patch.object(config_flow, "LIBRARY_CANDIDATES", ()):
        # With the simulator the form is its own step, which says it is simulated.
        result = await start_user_flow(hass, "simulator" if simulator else "local")
    expected = SIM_LIBRARY if simulator else config_dir / "rkllm" / "librkllmrt.so"
    assert schema_values(result, "suggested_value") == {
        CONF_LIBRARY_PATH: str(expected)
    }


def make_library(folder: Path, kind: str) -> Path:
    """Return a missing, text or aarch64 library in folder, or a simulator build."""
    if kind.endswith(".so"):
        return SIM_BUILD / kind
    path = folder / "librkllmrt.so"
    if kind == "text":
        path.write_text("not a library")
    elif kind == "aarch64":
        path.write_bytes(elf_header(183))
    return path


def make_path(folder: Path, kind: str) -> Path:
    """Return a missing path, a file, an empty folder or a path below a file."""
    path = folder / "target"
    if kind in ("file", "below_file"):
        path.write_text("")
    elif kind == "empty_dir":
        path.mkdir()
    return path / "sub" if kind == "below_file" else path


@pytest.mark.parametrize(
    ("library", "error"),
    [
        ("missing", "library_not_found"),
        ("text", "library_not_elf"),
        ("aarch64", "library_wrong_arch"),
        ("librkllm_sim_missing_symbol.so", "library_missing_symbols"),
        ("librkllm_sim_1_1.so", "library_unsupported_version"),
    ],
)
async def test_library_errors(
    hass: HomeAssistant,
    paths: dict[str, str],
    tmp_path: Path,
    library: str,
    error: str,
) -> None:
    """Each unusable library is a field error whose message carries the detail."""
    paths[CONF_LIBRARY_PATH] = str(make_library(tmp_path, library))
    result = await submit_paths(hass, paths)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "local"
    assert result["errors"] == {CONF_LIBRARY_PATH: error}
    assert result["description_placeholders"]["error"]
    # What was submitted stays, the ABI family's "auto" default included.
    assert schema_values(result, "suggested_value") == {
        **paths,
        CONF_ABI_FAMILY: ABI_FAMILY_AUTO,
    }


async def test_wrong_arch_placeholders(
    hass: HomeAssistant, tmp_path: Path, paths: dict[str, str]
) -> None:
    """The wrong-architecture message names both architectures."""
    paths[CONF_LIBRARY_PATH] = str(make_library(tmp_path, "aarch64"))
    result = await submit_paths(hass, paths)
    assert result["description_placeholders"]["found"] == "aarch64"
    assert result["description_placeholders"]["expected"] == "x86_64"


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("missing", "models_dir_missing"),
        ("file", "models_dir_not_dir"),
        ("empty_dir", "no_models"),
    ],
)
async def test_models_dir_errors(
    hass: HomeAssistant,
    tmp_path: Path,
    paths: dict[str, str],
    kind: str,
    error: str,
) -> None:
    """An unusable or empty models folder is a field error."""
    paths[CONF_MODELS_DIR] = str(make_path(tmp_path, kind))
    result = await submit_paths(hass, paths)
    assert result["errors"] == {CONF_MODELS_DIR: error}


async def test_models_dir_unreadable(
    in_process_host: None, hass: HomeAssistant, paths: dict[str, str]
) -> None:
    """A models folder that cannot be listed is a field error."""
    with patch(
        "custom_components.rockchip_llm.host.model_files.Path.iterdir",
        side_effect=PermissionError("denied"),
    ):
        result = await submit_paths(hass, paths)
    assert result["errors"] == {CONF_MODELS_DIR: "models_dir_unreadable"}


@pytest.mark.parametrize("kind", ["file", "below_file"])
async def test_cache_dir_is_a_file(
    hass: HomeAssistant,
    tmp_path: Path,
    paths: dict[str, str],
    kind: str,
) -> None:
    """A cache folder that is a file, or cannot be created, is a field error."""
    paths[CONF_CACHE_DIR] = str(make_path(tmp_path, kind))
    result = await submit_paths(hass, paths)
    assert result["errors"] == {CONF_CACHE_DIR: "cache_dir_not_writable"}


async def test_cache_dir_not_writable(
    in_process_host: None, hass: HomeAssistant, paths: dict[str, str]
) -> None:
    """A cache folder without write permission is a field error."""
    with patch.object(
        prompt_cache.tempfile, "TemporaryFile", side_effect=PermissionError("denied")
    ):
        result = await submit_paths(hass, paths)
    assert result["errors"] == {CONF_CACHE_DIR: "cache_dir_not_writable"}
    assert Path(paths[CONF_CACHE_DIR]).is_dir()


async def test_every_error_at_once(hass: HomeAssistant, tmp_path: Path) -> None:
    """All three fields are checked; each shows its own error."""
    (tmp_path / "models").mkdir()
    (tmp_path / "file").write_text("")
    result = await submit_paths(
        hass,
        {
            CONF_LIBRARY_PATH: str(tmp_path / "librkllmrt.so"),
            CONF_MODELS_DIR: str(tmp_path / "models"),
            CONF_CACHE_DIR: str(tmp_path / "file"),
        },
    )
    assert result["errors"] == {
        CONF_LIBRARY_PATH: "library_not_found",
        CONF_MODELS_DIR: "no_models",
        CONF_CACHE_DIR: "cache_dir_not_writable",
    }


async def test_unexpected_error(hass: HomeAssistant, paths: dict[str, str]) -> None:
    """An unexpected exception is a base error, not a crash."""
    with patch.object(
        config_flow, "_async_validate_host", side_effect=RuntimeError("boom")
    ):
        result = await submit_paths(hass, paths)
    assert result["errors"] == {"base": "unknown"}


@pytest.mark.usefixtures("mock_setup_entry")
async def test_recover_after_error(
    hass: HomeAssistant, tmp_path: Path, paths: dict[str, str]
) -> None:
    """After an error the form comes back; fixed input continues the flow."""
    result = await submit_paths(
        hass, {**paths, CONF_LIBRARY_PATH: str(tmp_path / "x.so")}
    )
    assert result["errors"] == {CONF_LIBRARY_PATH: "library_not_found"}

    result = dict(
        await hass.config_entries.flow.async_configure(result["flow_id"], paths)
    )
    assert result["step_id"] == "model"
    assert select_options(result, CONF_MODEL) == [
        {"value": "Qwen3 Sim", "label": "Qwen3 Sim (simulated)"}
    ]
    result = dict(
        await hass.config_entries.flow.async_configure(
            result["flow_id"], {CONF_MODEL: "Qwen3 Sim"}
        )
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"] == paths


@pytest.mark.usefixtures("mock_setup_entry")
async def test_paths_normalized(
    hass: HomeAssistant,
    config_dir: Path,
    tmp_path: Path,
    paths: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Spaces are stripped, ~ is expanded, relative paths are in the config folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    result = await submit_paths(
        hass,
        {
            CONF_LIBRARY_PATH: f" {paths[CONF_LIBRARY_PATH]} ",
            CONF_MODELS_DIR: "~/models",
            CONF_CACHE_DIR: "rkllm/cache",
        },
    )
    result = dict(
        await hass.config_entries.flow.async_configure(
            result["flow_id"], {CONF_MODEL: "Qwen3 Sim"}
        )
    )
    assert result["data"] == {
        CONF_LIBRARY_PATH: paths[CONF_LIBRARY_PATH],
        CONF_MODELS_DIR: paths[CONF_MODELS_DIR],
        CONF_CACHE_DIR: str(config_dir / "rkllm" / "cache"),
        CONF_CACHE_BUDGET: DEFAULT_CACHE_BUDGET_MB,
        CONF_STALL_TIMEOUT: DEFAULT_STALL_TIMEOUT_S,
    }


async def test_duplicate(
    hass: HomeAssistant, entry: MockConfigEntry, paths: dict[str, str], tmp_path: Path
) -> None:
    """The same library and models folder cannot be configured twice."""
    result = await submit_paths(
        hass, {**paths, CONF_CACHE_DIR: str(tmp_path / "other")}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"


async def test_reconfigure(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    paths: dict[str, str],
    tmp_path: Path,
    mock_setup_entry: AsyncMock,
) -> None:
    """Reconfigure shows the current paths, validates the new ones and reloads."""
    result = dict(await entry.start_reconfigure_flow(hass))
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reconfigure"
    assert schema_values(result, "suggested_value") == paths

    bad = {**paths, CONF_MODELS_DIR: str(tmp_path / "nowhere")}
    result = dict(
        await hass.config_entries.flow.async_configure(result["flow_id"], bad)
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reconfigure"
    assert result["errors"] == {CONF_MODELS_DIR: "models_dir_missing"}
    assert schema_values(result, "suggested_value") == {
        **bad,
        CONF_ABI_FAMILY: ABI_FAMILY_AUTO,
    }

    new = {
        **paths,
        CONF_CACHE_DIR: str(tmp_path / "new cache"),
        CONF_CACHE_BUDGET: 512,
        CONF_STALL_TIMEOUT: 90,
    }
    result = dict(
        await hass.config_entries.flow.async_configure(result["flow_id"], new)
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert dict(entry.data) == new
    assert len(entry.subentries) == 1
    assert len(mock_setup_entry.mock_calls) == 1


async def test_reconfigure_duplicate(
    hass: HomeAssistant, entry: MockConfigEntry, paths: dict[str, str], tmp_path: Path
) -> None:
    """Reconfigure cannot point an entry at another entry's runtime."""
    other_models = tmp_path / "other models"
    other = MockConfigEntry(
        domain=DOMAIN, data={**paths, CONF_MODELS_DIR: str(other_models)}
    )
    other.add_to_hass(hass)
    result = await other.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], paths)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert other.data[CONF_MODELS_DIR] == str(other_models)


async def test_subentry_add(hass: HomeAssistant, loaded_entry: MockConfigEntry) -> None:
    """A new agent gets every option; numbers that are counts are stored as ints."""
    result = await hass.config_entries.subentries.async_init(
        (loaded_entry.entry_id, SUBENTRY_CONVERSATION),
        context={"source": config_entries.SOURCE_USER},
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "set_options"
    assert schema_values(dict(result), "suggested_value") == {
        CONF_MODEL: "Beta",
        **DEFAULT_OPTIONS,
        CONF_TOOL_GROUPS: ALL_TOOL_GROUPS,
    }
    # The form shows each tool group's tokens and the model's limit.
    placeholders = result["description_placeholders"]
    assert "lights_switches: " in placeholders["tool_costs"]
    assert placeholders["model_limits"] == "Qwen3 Sim: 4,096 tokens"  # as loaded
    assert CONF_NAME in result["data_schema"].schema
    assert [option["value"] for option in select_options(dict(result), CONF_MODEL)] == [
        "Beta",
        "Qwen3 Sim",
    ]
    assert select_options(dict(result), CONF_HISTORY_STRATEGY) == [
        "auto",
        "prompt_cache_only",
        "off",
    ]

    known = set(loaded_entry.subentries)
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_NAME: "Pirate", **AGENT_INPUT}
    )
    (added,) = set(loaded_entry.subentries) - known
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "Pirate"
    subentry = loaded_entry.subentries[added]
    assert subentry.title == "Pirate"
    assert dict(subentry.data) == AGENT_DATA
    for key in (
        CONF_MAX_CONTEXT_LEN,
        CONF_MAX_NEW_TOKENS,
        CONF_TOP_K,
        CONF_MAX_HISTORY,
    ):
        assert type(subentry.data[key]) is int


async def test_subentry_add_minimal(
    hass: HomeAssistant, loaded_entry: MockConfigEntry
) -> None:
    """Without a name, model and kind name the agent; no API and no prompt are kept."""
    result = await hass.config_entries.subentries.async_init(
        (loaded_entry.entry_id, SUBENTRY_CONVERSATION),
        context={"source": config_entries.SOURCE_USER},
    )
    user_input = {
        key: value
        for key, value in AGENT_INPUT.items()
        if key not in (CONF_PROMPT, CONF_LLM_HASS_API)
    }
    known = set(loaded_entry.subentries)
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_NAME: "  ", **user_input}
    )
    (added,) = set(loaded_entry.subentries) - known
    assert result["type"] is FlowResultType.CREATE_ENTRY
    subentry = loaded_entry.subentries[added]
    assert subentry.title == "Beta Conversation"
    assert CONF_LLM_HASS_API not in subentry.data
    assert subentry.data[CONF_PROMPT] == ""


async def test_subentry_reconfigure(
    hass: HomeAssistant, loaded_entry: MockConfigEntry
) -> None:
    """Reconfigure suggests the agent's options and replaces them."""
    subentry_id = next(iter(loaded_entry.subentries))
    await hass.async_block_till_done()  # the entry reloads after a change
    result = await loaded_entry.start_subentry_reconfigure_flow(hass, subentry_id)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reconfigure"
    assert CONF_NAME not in result["data_schema"].schema
    assert schema_values(dict(result), "suggested_value") == {
        CONF_MODEL: "Qwen3 Sim",
        **DEFAULT_OPTIONS,
        CONF_TOOL_GROUPS: ALL_TOOL_GROUPS,
    }

    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {**AGENT_INPUT, CONF_LLM_HASS_API: []}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    subentry = loaded_entry.subentries[subentry_id]
    assert subentry.title == "Qwen3 Sim"
    assert dict(subentry.data) == {
        key: value for key, value in AGENT_DATA.items() if key != CONF_LLM_HASS_API
    }

    # Without an API stored, none is suggested.
    await hass.async_block_till_done()  # the entry reloads after a change
    result = await loaded_entry.start_subentry_reconfigure_flow(hass, subentry_id)
    assert schema_values(dict(result), "suggested_value")[CONF_LLM_HASS_API] == []


async def test_subentry_reconfigure_unknown_api(
    hass: HomeAssistant, loaded_entry: MockConfigEntry
) -> None:
    """APIs that no longer exist are not suggested."""
    subentry = next(iter(loaded_entry.subentries.values()))
    hass.config_entries.async_update_subentry(
        loaded_entry,
        subentry,
        data={**subentry.data, CONF_LLM_HASS_API: ["gone", llm.LLM_API_ASSIST]},
    )
    await hass.async_block_till_done()  # the entry reloads after a change
    result = await loaded_entry.start_subentry_reconfigure_flow(
        hass, subentry.subentry_id
    )
    assert schema_values(dict(result), "suggested_value")[CONF_LLM_HASS_API] == [
        llm.LLM_API_ASSIST
    ]


@pytest.mark.parametrize(
    "source", [config_entries.SOURCE_USER, config_entries.SOURCE_RECONFIGURE]
)
async def test_subentry_entry_not_loaded(
    hass: HomeAssistant, entry: MockConfigEntry, source: str
) -> None:
    """Agents cannot be added or changed while the runtime is not loaded."""
    context: dict[str, Any] = {"source": source}
    if source == config_entries.SOURCE_RECONFIGURE:
        context["subentry_id"] = next(iter(entry.subentries))
    result = await hass.config_entries.subentries.async_init(
        (entry.entry_id, SUBENTRY_CONVERSATION), context=context
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "entry_not_loaded"


@pytest.mark.parametrize(
    ("remove", "reason"), [("models", "no_models"), ("folder", "models_dir_missing")]
)
async def test_subentry_models_gone(
    hass: HomeAssistant,
    loaded_entry: MockConfigEntry,
    models_dir: Path,
    remove: str,
    reason: str,
) -> None:
    """Without models there is nothing to configure: the flow aborts and says where."""
    for folder in models_dir.iterdir() if remove == "models" else (models_dir,):
        shutil.rmtree(folder)
    result = await hass.config_entries.subentries.async_init(
        (loaded_entry.entry_id, SUBENTRY_CONVERSATION),
        context={"source": config_entries.SOURCE_USER},
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == reason
    assert result["description_placeholders"] == {CONF_MODELS_DIR: str(models_dir)}


CHAT_ONLY = (CONF_PROMPT, CONF_LLM_HASS_API, CONF_MAX_HISTORY, CONF_HISTORY_STRATEGY)


async def test_ai_task_subentry(
    hass: HomeAssistant, loaded_entry: MockConfigEntry
) -> None:
    """An AI Task agent has the model and sampling options, no prompt, tools or history."""
    result = await hass.config_entries.subentries.async_init(
        (loaded_entry.entry_id, SUBENTRY_AI_TASK),
        context={"source": config_entries.SOURCE_USER},
    )
    assert result["type"] is FlowResultType.FORM
    fields = {str(key) for key in result["data_schema"].schema}
    assert not fields & set(CHAT_ONLY)
    assert {
        CONF_MODEL,
        CONF_MAX_CONTEXT_LEN,
        CONF_TEMPERATURE,
        CONF_ENABLE_THINKING,
    } <= fields
    task_input = {
        key: value for key, value in AGENT_INPUT.items() if key not in CHAT_ONLY
    }
    known = set(loaded_entry.subentries)
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {CONF_NAME: "Summaries", **task_input}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    (added,) = set(loaded_entry.subentries) - known
    subentry = loaded_entry.subentries[added]
    assert subentry.subentry_type == SUBENTRY_AI_TASK
    assert subentry.title == "Summaries"
    assert dict(subentry.data) == {
        key: value for key, value in AGENT_DATA.items() if key not in CHAT_ONLY
    }
    # Reconfiguring shows the AI Task agent's own reconfigure form.
    await hass.async_block_till_done()  # the entry reloads after a change
    result = await loaded_entry.start_subentry_reconfigure_flow(hass, added)
    assert result["step_id"] == "reconfigure"
    fields = {str(key) for key in result["data_schema"].schema}
    assert not fields & {*CHAT_ONLY, CONF_NAME}


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        (CONF_LIBRARY_PATH, "/dev/null", "library_not_elf"),
        (CONF_LIBRARY_PATH, "directory", "library_not_elf"),
        (CONF_MODELS_DIR, "loop", "models_dir_unreadable"),
        (CONF_MODELS_DIR, "/dev/null", "models_dir_not_dir"),
        (CONF_CACHE_DIR, "/dev/null", "cache_dir_not_writable"),
    ],
)
async def test_paths_at_devices_and_loops(
    hass: HomeAssistant,
    tmp_path: Path,
    paths: dict[str, str],
    field: str,
    value: str,
    error: str,
) -> None:
    """Devices, directories given as files and symlink loops are field errors, not crashes."""
    if value == "loop":
        loop = tmp_path / "loop"
        loop.symlink_to(loop)
        value = str(loop)
    elif value == "directory":
        value = str(tmp_path)
    paths[field] = value
    result = await submit_paths(hass, paths)
    assert result["errors"] == {field: error}
