"""Config flow of the Rockchip LLM integration: the runtime entry and its agents."""

from collections.abc import Mapping
from dataclasses import dataclass, field
import logging
import os
from pathlib import Path
from typing import Any, Final

from homeassistant.config_entries import (
    SOURCE_USER,
    SOURCE_ZEROCONF,
    ConfigEntry,
    ConfigEntryState,
    ConfigFlow,
    ConfigFlowResult,
    ConfigSubentryFlow,
    SubentryFlowResult,
)
from homeassistant.const import CONF_LLM_HASS_API, CONF_NAME
from homeassistant.core import HomeAssistant, callback
from homeassistant.data_entry_flow import AbortFlow
from homeassistant.helpers import llm
from homeassistant.helpers.selector import (
    BooleanSelector,
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    SelectOptionDict,
    SelectSelector,
    SelectSelectorConfig,
    SelectSelectorMode,
    TemplateSelector,
    TextSelector,
)
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from homeassistant.helpers.typing import VolDictType

from .agent import Agent
from .connect import async_open_host, parse_address
from .const import (
    ABI_FAMILY_AUTO,
    AGENT_OPTION_DEFAULTS,
    AI_TASK_MAX_NEW_TOKENS,
    CONF_ABI_FAMILY,
    CONF_CACHE_BUDGET,
    CONF_CACHE_DIR,
    CONF_ENABLE_THINKING,
    CONF_HISTORY_STRATEGY,
    CONF_HOST_ADDRESS,
    CONF_HOST_IDENTITY,
    CONF_LIBRARY_PATH,
    CONF_MAX_CONTEXT_LEN,
    CONF_MAX_HISTORY,
    CONF_MAX_NEW_TOKENS,
    CONF_MODEL,
    CONF_MODELS_DIR,
    CONF_PAIRING_KEY,
    CONF_PROMPT,
    CONF_REPEAT_PENALTY,
    CONF_STALL_TIMEOUT,
    CONF_TEMPERATURE,
    CONF_TOOL_GROUPS,
    CONF_TOP_K,
    CONF_TOP_P,
    CONFIG_SUBDIR,
    DEFAULT_CACHE_BUDGET_MB,
    DEFAULT_PROMPT_FILE,
    DEFAULT_STALL_TIMEOUT_S,
    DOMAIN,
    LIBRARY_CANDIDATES,
    MAX_CONTEXT_FIELD,
    SUBENTRY_AI_TASK,
    SUBENTRY_CONVERSATION,
    HistoryStrategy,
)
from .ha_compat import vol
from .host.identity import PAIRING_KEY_FILE, format_pairing_key, parse_pairing_key
from .host.model_files import ModelInfo, ModelScan, ModelsDirError
from .host.rkllm.abi import AbiFamily, family_setting
from .host.rkllm.errors import LibraryCopyFailed
from .host.rkllm.library import LIBRARY_NAME, file_is_simulator
from .host.version import DEFAULT_PORT
from .host.wire import HostBusy, HostError, HostPairingRefused
from .link import TcpHost
from .prefix_report import async_group_costs, costs_text
from .remote import RuntimeHost
from .simulation import SIMULATOR_ENV, simulated_label
from .tool_groups import ToolGroup

_LOGGER = logging.getLogger(__name__)

_ENTRY_TITLE: Final = "Rockchip LLM"
_PATH_FIELDS: Final = (CONF_LIBRARY_PATH, CONF_MODELS_DIR, CONF_CACHE_DIR)


@dataclass(slots=True)
class _Validation:
    """The outcome of checking the three runtime paths."""

    errors: dict[str, str] = field(default_factory=dict)
    placeholders: dict[str, str] = field(default_factory=dict)
    models: dict[str, ModelInfo] = field(default_factory=dict)
    simulated: bool = False
    """The library is the development simulator."""
    identity: str | None = None
    """A TCP host's identity, seen and proven by the pairing key."""


def _host_facts(host: RuntimeHost) -> dict[str, str]:
    """Return what the host reports, for the model step's description."""
    runtime = host.runtime
    board = host.board
    version = runtime.version if runtime else "?"
    return {
        "host": host.where,
        # The simulator stands in for it: said where the runtime is named.
        "runtime_version": f"{version} (the simulator, no NPU)"
        if host.simulated
        else version,
        "soc": str(board.get("soc") or "").upper() or "an unknown SoC",
        "npu_driver": str(board.get("npu_driver_version") or "of unknown version"),
    }


def _detect_library(config_location: Path) -> Path:
    """Return the first existing runtime library, else the configuration location."""
    for candidate in (*LIBRARY_CANDIDATES, config_location):
        if candidate.is_file():
            return candidate
    if (simulator := os.environ.get(SIMULATOR_ENV)) and Path(simulator).is_file():
        return Path(simulator)
    return config_location


def _library_validation(host: RuntimeHost, result: _Validation) -> None:
    """Note the host's verdict on its library in result."""
    err = host.library_error()
    if err is None:
        result.simulated = host.simulated
    elif isinstance(err, LibraryCopyFailed):
        result.errors[CONF_CACHE_DIR] = "cache_dir_not_writable"
    else:
        key = getattr(err, "translation_key", "library_error")
        result.errors[CONF_LIBRARY_PATH] = key
        result.placeholders.update(getattr(err, "placeholders", {}))


async def _async_validate_host(host: RuntimeHost, result: _Validation) -> None:
    """Note the host's library, cache folder and models in result."""
    _library_validation(host, result)
    if not host.hello.get("cache_writable", True):
        result.errors[CONF_CACHE_DIR] = "cache_dir_not_writable"
    try:
        result.models = (await host.async_scan()).models
    except ModelsDirError as err:
        result.errors[CONF_MODELS_DIR] = err.reason
    else:
        if not result.models:
            result.errors[CONF_MODELS_DIR] = "no_models"


def _discovered_address(discovery_info: ZeroconfServiceInfo) -> str:
    """Return a discovered host's address as the host step takes it (host:port)."""
    ip = discovery_info.ip_address
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{host}:{discovery_info.port or DEFAULT_PORT}"


def _runtime_identity(paths: Mapping[str, Any]) -> dict[str, Any]:
    """Return what makes two entries the same runtime: library and models folder."""
    return {key: paths[key] for key in (CONF_LIBRARY_PATH, CONF_MODELS_DIR)}


def _read_default_prompt() -> str:
    """Return the default prompt template (blocking)."""
    return DEFAULT_PROMPT_FILE.read_text(encoding="utf-8")


def _format_size(size_bytes: int) -> str:
    """Format a file size in GB, or in MB below one GB."""
    if size_bytes >= 1_000_000_000:
        return f"{size_bytes / 1_000_000_000:.1f} GB"
    return f"{size_bytes / 1_000_000:.1f} MB"


def model_selector(models: Mapping[str, ModelInfo], simulated: bool) -> SelectSelector:
    """Return a dropdown of the discovered models, labelled with their size.

    Simulated models are tiny text files: their size would mean nothing.
    """
    return SelectSelector(
        SelectSelectorConfig(
            options=[
                SelectOptionDict(
                    value=name,
                    label=simulated_label(name)
                    if simulated
                    else f"{name} ({_format_size(info.size_bytes)})",
                )
                for name, info in models.items()
            ],
            mode=SelectSelectorMode.DROPDOWN,
        )
    )


def _default_agent_options(
    model: str, prompt: str, *, chat: bool = True
) -> dict[str, Any]:
    """Return the options of a new agent on model (chat: a conversation agent)."""
    options = {
        CONF_MODEL: model,
        CONF_PROMPT: prompt,
        CONF_LLM_HASS_API: [llm.LLM_API_ASSIST],
        **AGENT_OPTION_DEFAULTS,
    }
    if not chat:
        options[CONF_MAX_NEW_TOKENS] = AI_TASK_MAX_NEW_TOKENS
    return options


_KIND_NAMES: Final = {
    SUBENTRY_CONVERSATION: "Conversation",
    SUBENTRY_AI_TASK: "AI Task",
}
"""What a default agent name calls each kind of agent (as HA's own LLM agents do)."""


def default_agent_name(model: str, subentry_type: str, taken: set[str]) -> str:
    """Return a name for a new agent that says its model and kind, unique in taken."""
    name = f"{model} {_KIND_NAMES[subentry_type]}"
    number = 2
    unique = name
    while unique in taken:
        unique = f"{name} {number}"
        number += 1
    return unique


def _format_tokens(count: int) -> str:
    return f"{count:,}"


def _number(
    minimum: float,
    maximum: float,
    step: float = 1,
    mode: NumberSelectorMode = NumberSelectorMode.BOX,
) -> NumberSelector:
    """Return a number selector."""
    return NumberSelector(
        NumberSelectorConfig(min=minimum, max=maximum, step=step, mode=mode)
    )


def _integer(minimum: int, maximum: int) -> vol.All[int]:
    """Return an integer input box."""
    return vol.All(_number(minimum, maximum), vol.Coerce(int))


def _slider(minimum: float, maximum: float) -> NumberSelector:
    """Return a slider in steps of 0.05."""
    return _number(minimum, maximum, 0.05, NumberSelectorMode.SLIDER)


def _agent_schema(
    hass: HomeAssistant,
    models: Mapping[str, ModelInfo],
    *,
    is_new: bool,
    chat: bool,
    simulated: bool,
) -> vol.Schema:
    """Return the schema of the agent options form (chat: a conversation agent)."""
    schema: VolDictType = {vol.Optional(CONF_NAME): str} if is_new else {}
    schema[vol.Required(CONF_MODEL)] = model_selector(models, simulated)
    if chat:
        schema[vol.Optional(CONF_PROMPT)] = TemplateSelector()
        schema[vol.Optional(CONF_LLM_HASS_API)] = SelectSelector(
            SelectSelectorConfig(
                options=[
                    SelectOptionDict(value=api.id, label=api.name)
                    for api in llm.async_get_apis(hass)
                ],
                multiple=True,
            )
        )
        schema[vol.Optional(CONF_TOOL_GROUPS)] = SelectSelector(
            SelectSelectorConfig(
                options=[group.value for group in ToolGroup],
                translation_key=CONF_TOOL_GROUPS,
                multiple=True,
            )
        )
    schema.update(
        {
            vol.Required(CONF_MAX_CONTEXT_LEN): _integer(0, MAX_CONTEXT_FIELD),
            vol.Required(CONF_MAX_NEW_TOKENS): _integer(16, 4096),
            vol.Required(CONF_TEMPERATURE): _slider(0, 2),
            vol.Required(CONF_TOP_K): _integer(1, 100),
            vol.Required(CONF_TOP_P): _slider(0, 1),
            vol.Required(CONF_REPEAT_PENALTY): _slider(1, 2),
            vol.Required(CONF_ENABLE_THINKING): BooleanSelector(),
        }
    )
    if chat:
        schema[vol.Required(CONF_MAX_HISTORY)] = _integer(0, 50)
        schema[vol.Required(CONF_HISTORY_STRATEGY)] = SelectSelector(
            SelectSelectorConfig(
                options=[strategy.value for strategy in HistoryStrategy],
                translation_key=CONF_HISTORY_STRATEGY,
                mode=SelectSelectorMode.DROPDOWN,
            )
        )
    return vol.Schema(schema)


_BUDGET_SELECTOR: Final = NumberSelector(
    NumberSelectorConfig(
        min=16,
        max=1_000_000,
        step=1,
        mode=NumberSelectorMode.BOX,
        unit_of_measurement="MB",
    )
)


_STALL_SELECTOR: Final = NumberSelector(
    NumberSelectorConfig(
        min=5, max=600, step=1, mode=NumberSelectorMode.BOX, unit_of_measurement="s"
    )
)


def _runtime_settings(user_input: Mapping[str, Any]) -> dict[str, int]:
    """Return the runtime's settings from a form: cache budget and watchdog time."""
    return {
        CONF_CACHE_BUDGET: int(
            user_input.get(CONF_CACHE_BUDGET, DEFAULT_CACHE_BUDGET_MB)
        ),
        CONF_STALL_TIMEOUT: int(
            user_input.get(CONF_STALL_TIMEOUT, DEFAULT_STALL_TIMEOUT_S)
        ),
    }


_HOST_SCHEMA: Final = vol.Schema(
    {
        vol.Required(CONF_HOST_ADDRESS): TextSelector(),
        vol.Optional(CONF_PAIRING_KEY): TextSelector(),
    }
)
_PAIRING_PLACES: Final = {"key_file": PAIRING_KEY_FILE}
"""Placeholders of the texts that say where a host keeps its pairing key."""


def _host_data(user_input: Mapping[str, Any], result: _Validation) -> dict[str, str]:
    """Return a host form's entry data: the address and, for TCP, the key as printed.

    A missing or malformed key, or an address that is none, goes to result.errors.
    """
    address = str(user_input[CONF_HOST_ADDRESS]).strip()
    data = {CONF_HOST_ADDRESS: address}
    try:
        parsed = parse_address(address)
    except ValueError as err:
        result.errors[CONF_HOST_ADDRESS] = "invalid_host_address"
        result.placeholders["error"] = str(err)
        return data
    if not isinstance(parsed, TcpHost):
        return data
    typed = str(user_input.get(CONF_PAIRING_KEY, "")).strip()
    if not typed:
        result.errors[CONF_PAIRING_KEY] = "pairing_key_required"
        return data
    try:
        data[CONF_PAIRING_KEY] = format_pairing_key(parse_pairing_key(typed))
    except ValueError as err:
        result.errors[CONF_PAIRING_KEY] = "invalid_pairing_key"
        result.placeholders["error"] = str(err)
    return data


class RockchipLLMConfigFlow(ConfigFlow, domain=DOMAIN):
    """Set up one RKLLM runtime: library, models folder and cache folder."""

    VERSION = 1

    def __init__(self) -> None:
        """Initialize the flow."""
        self._paths: dict[str, str | int] = {}
        self._models: dict[str, ModelInfo] = {}
        self._simulated = False
        self._host_facts: dict[str, str] = {}
        self._discovered: dict[str, str] = {}
        """The address of a host found by discovery, and its name."""

    def _normalize_paths(self, user_input: Mapping[str, Any]) -> dict[str, str]:
        """Return the paths made absolute; relative paths are under the config folder."""
        paths: dict[str, str] = {}
        for key in _PATH_FIELDS:
            path = Path(user_input[key].strip()).expanduser()
            paths[key] = str(
                path if path.is_absolute() else self.hass.config.path(str(path))
            )
        if (family := user_input.get(CONF_ABI_FAMILY, ABI_FAMILY_AUTO)) != (
            ABI_FAMILY_AUTO
        ):
            paths[CONF_ABI_FAMILY] = family
        return paths

    async def _async_validate(self, data: Mapping[str, Any]) -> _Validation:
        """Ask the host data describes (started for the check, here) what it has."""
        result = _Validation()
        try:
            host = await async_open_host(self.hass, data, f"config flow {self.flow_id}")
        except HostError as err:
            field = CONF_PAIRING_KEY if isinstance(err, HostPairingRefused) else "base"
            result.errors[field] = err.translation_key
            result.placeholders["error"] = str(err)
            return result
        try:
            await _async_validate_host(host, result)
            result.identity = host.identity
            self._host_facts = _host_facts(host)
        except Exception:
            _LOGGER.exception("Unexpected error while checking the runtime")
            return _Validation(errors={"base": "unknown"})
        finally:
            await host.async_close()
        return result

    async def _async_show_paths_form(
        self,
        step_id: str,
        suggested: Mapping[str, Any] | None = None,
        validation: _Validation | None = None,
    ) -> ConfigFlowResult:
        """Show the form of the three runtime paths.

        Without suggestions the library is detected; when that finds only the
        development simulator, the form is the "simulator" step, which says so.
        """
        if suggested is None:
            library = await self.hass.async_add_executor_job(
                _detect_library,
                Path(self.hass.config.path(CONFIG_SUBDIR, LIBRARY_NAME)),
            )
            suggested = {CONF_LIBRARY_PATH: str(library)}
            if step_id == "local" and await self.hass.async_add_executor_job(
                file_is_simulator, library
            ):
                step_id = "simulator"
        schema = vol.Schema(
            {
                vol.Required(CONF_LIBRARY_PATH): TextSelector(),
                vol.Required(
                    CONF_MODELS_DIR,
                    default=self.hass.config.path(CONFIG_SUBDIR, "models"),
                ): TextSelector(),
                vol.Required(
                    CONF_CACHE_DIR,
                    default=self.hass.config.path(CONFIG_SUBDIR, "cache"),
                ): TextSelector(),
                vol.Required(
                    CONF_CACHE_BUDGET, default=DEFAULT_CACHE_BUDGET_MB
                ): _BUDGET_SELECTOR,
                vol.Required(
                    CONF_STALL_TIMEOUT, default=DEFAULT_STALL_TIMEOUT_S
                ): _STALL_SELECTOR,
                vol.Optional(CONF_ABI_FAMILY, default=ABI_FAMILY_AUTO): SelectSelector(
                    SelectSelectorConfig(
                        options=[ABI_FAMILY_AUTO, *map(family_setting, AbiFamily)],
                        translation_key=CONF_ABI_FAMILY,
                        mode=SelectSelectorMode.DROPDOWN,
                    )
                ),
            }
        )
        validation = validation or _Validation()
        return self.async_show_form(
            step_id=step_id,
            data_schema=self.add_suggested_values_to_schema(schema, suggested),
            errors=validation.errors,
            description_placeholders=validation.placeholders,
        )

    async def async_step_user(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask where the runtime runs: on this machine, or in a runtime host."""
        return self.async_show_menu(step_id="user", menu_options=["local", "host"])

    async def async_step_local(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask for the runtime library, the models folder and the cache folder."""
        return await self._async_step_paths("local", user_input)

    async def async_step_host(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask for the address of a runtime host (and a TCP host's pairing key)."""
        validation = _Validation()
        if user_input is not None:
            data = _host_data(user_input, validation)
            if not validation.errors:
                self._async_abort_entries_match(
                    {CONF_HOST_ADDRESS: data[CONF_HOST_ADDRESS]}
                )
                validation = await self._async_validate(data)
            if not validation.errors:
                self._check_announced(validation)
            if not validation.errors:
                if validation.identity is not None:
                    await self.async_set_unique_id(validation.identity)
                    self._abort_if_unique_id_configured(error="host_already_configured")
                    data[CONF_HOST_IDENTITY] = validation.identity
                self._paths = dict(data)
                self._models = validation.models
                self._simulated = validation.simulated
                return await self.async_step_model()
        return self.async_show_form(
            step_id="host",
            data_schema=self.add_suggested_values_to_schema(
                _HOST_SCHEMA, user_input or self._discovered
            ),
            errors=validation.errors,
            description_placeholders={**_PAIRING_PLACES, **validation.placeholders},
        )

    def _check_announced(self, validation: _Validation) -> None:
        """Refuse a discovered host whose pinned identity is not the announced one."""
        announced = self.unique_id if self.source == SOURCE_ZEROCONF else None
        if announced is not None and validation.identity != announced:
            validation.errors["base"] = "identity_not_announced"
            validation.placeholders.update(
                identity=validation.identity or "none", announced=announced
            )

    async def async_step_zeroconf(
        self, discovery_info: ZeroconfServiceInfo
    ) -> ConfigFlowResult:
        """Offer a host that announced itself on the LAN; follow one that moved."""
        identity = discovery_info.properties.get("id")
        if not identity:
            return self.async_abort(reason="discovered_without_id")
        address = _discovered_address(discovery_info)
        await self.async_set_unique_id(str(identity))
        await self._async_follow_moved_host(address)
        self._async_abort_entries_match({CONF_HOST_ADDRESS: address})
        name = str(discovery_info.properties.get("name") or discovery_info.hostname)
        self._discovered = {CONF_HOST_ADDRESS: address, CONF_NAME: name}
        self.context["title_placeholders"] = {"name": name}
        return await self.async_step_zeroconf_confirm()

    async def _async_follow_moved_host(self, address: str) -> None:
        """Abort for a configured host; give it the new address if it proves itself.

        Only a host that proves the entry's pinned identity and pairing key at the
        announced address moves the entry there: a forged announcement cannot.
        """
        entry = self.hass.config_entries.async_entry_for_domain_unique_id(
            DOMAIN, self.unique_id or ""
        )
        if entry is None or entry.data.get(CONF_HOST_ADDRESS) == address:
            self._abort_if_unique_id_configured(error="host_already_configured")
            return
        moved = {**entry.data, CONF_HOST_ADDRESS: address}
        try:
            host = await async_open_host(
                self.hass, moved, f"config flow {self.flow_id}"
            )
        except HostBusy:
            pass  # it proved identity and key before it said it serves the entry
        except HostError as err:
            _LOGGER.warning(
                "Not moving %s to %s, announced for its host: %s",
                entry.title,
                address,
                err,
            )
            raise AbortFlow("host_already_configured") from err
        else:
            await host.async_close()
        self._abort_if_unique_id_configured(
            updates={CONF_HOST_ADDRESS: address}, error="host_already_configured"
        )

    async def async_step_zeroconf_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask whether to set up the discovered host, then go on to the host step."""
        if user_input is None:
            self._set_confirm_only()
            return self.async_show_form(
                step_id="zeroconf_confirm",
                description_placeholders={
                    "name": self._discovered[CONF_NAME],
                    "address": self._discovered[CONF_HOST_ADDRESS],
                },
            )
        return await self.async_step_host()

    async def async_step_simulator(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask for the paths, pre-filled with the simulator (no runtime was found)."""
        return await self._async_step_paths("simulator", user_input)

    async def _async_step_paths(
        self, step_id: str, user_input: dict[str, Any] | None
    ) -> ConfigFlowResult:
        if user_input is None:
            return await self._async_show_paths_form(step_id)
        paths = self._normalize_paths(user_input)
        self._async_abort_entries_match(_runtime_identity(paths))
        validation = await self._async_validate(
            {**paths, **_runtime_settings(user_input)}
        )
        if validation.errors:
            return await self._async_show_paths_form(step_id, user_input, validation)
        self._paths = {**paths, **_runtime_settings(user_input)}
        self._models = validation.models
        self._simulated = validation.simulated
        return await self.async_step_model()

    async def async_step_model(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Pick the model of the first conversation agent."""
        if user_input is None:
            return self.async_show_form(
                step_id="model",
                data_schema=vol.Schema(
                    {
                        vol.Required(
                            CONF_MODEL, default=next(iter(self._models))
                        ): model_selector(self._models, self._simulated)
                    }
                ),
                description_placeholders=self._host_facts,
            )
        model = user_input[CONF_MODEL]
        prompt = await self.hass.async_add_executor_job(_read_default_prompt)
        where = self._discovered.get(CONF_NAME) or self._paths.get(CONF_HOST_ADDRESS)
        return self.async_create_entry(
            title=f"{_ENTRY_TITLE} ({where})" if where else _ENTRY_TITLE,
            data=self._paths,
            subentries=[
                {
                    "subentry_type": SUBENTRY_CONVERSATION,
                    "data": _default_agent_options(model, prompt),
                    "title": default_agent_name(model, SUBENTRY_CONVERSATION, set()),
                    "unique_id": None,
                }
            ],
        )

    async def async_step_reconfigure(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Change the paths of a configured runtime."""
        entry = self._get_reconfigure_entry()
        if CONF_HOST_ADDRESS in entry.data:
            return await self.async_step_reconfigure_host(user_input)
        if user_input is None:
            return await self._async_show_paths_form("reconfigure", entry.data)
        paths = self._normalize_paths(user_input)
        if (identity := _runtime_identity(paths)) != _runtime_identity(entry.data):
            self._async_abort_entries_match(identity)
        validation = await self._async_validate(
            {**paths, **_runtime_settings(user_input)}
        )
        if validation.errors:
            return await self._async_show_paths_form(
                "reconfigure", user_input, validation
            )
        return self._async_update_entry(
            entry, data={**paths, **_runtime_settings(user_input)}
        )

    async def async_step_reconfigure_host(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Change the address of a runtime host (or its pairing key)."""
        entry = self._get_reconfigure_entry()
        validation = _Validation()
        if user_input is not None:
            data = _host_data(user_input, validation)
            stored = {
                key: entry.data[key]
                for key in (CONF_HOST_ADDRESS, CONF_PAIRING_KEY)
                if key in entry.data
            }
            if not validation.errors and data == stored:
                # The host may be serving this entry now: nothing to check.
                return self._async_update_entry(entry, data=entry.data)
            if not validation.errors:
                if data[CONF_HOST_ADDRESS] != entry.data[CONF_HOST_ADDRESS]:
                    self._async_abort_entries_match(
                        {CONF_HOST_ADDRESS: data[CONF_HOST_ADDRESS]}
                    )
                validation = await self._async_validate(data)
            if not validation.errors:
                return self._async_paired(entry, data, validation.identity)
        return self.async_show_form(
            step_id="reconfigure_host",
            data_schema=self.add_suggested_values_to_schema(
                _HOST_SCHEMA, user_input or entry.data
            ),
            errors=validation.errors,
            description_placeholders={**_PAIRING_PLACES, **validation.placeholders},
        )

    async def async_step_reauth(
        self, entry_data: Mapping[str, Any]
    ) -> ConfigFlowResult:
        """Pair again with a TCP host that refused the key or changed its identity."""
        return await self.async_step_reauth_confirm()

    async def async_step_reauth_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask for the host's pairing key; pin the identity it then proves."""
        entry = self._get_reauth_entry()
        address = str(entry.data[CONF_HOST_ADDRESS])
        validation = _Validation()
        if user_input is not None:
            data = _host_data({**user_input, CONF_HOST_ADDRESS: address}, validation)
            if not validation.errors:
                validation = await self._async_validate(data)
            if not validation.errors:
                return self._async_paired(entry, data, validation.identity)
        return self.async_show_form(
            step_id="reauth_confirm",
            data_schema=vol.Schema({vol.Required(CONF_PAIRING_KEY): TextSelector()}),
            errors=validation.errors,
            description_placeholders={
                **_PAIRING_PLACES,
                "address": address,
                "reason": entry.reason or "",
                **validation.placeholders,
            },
        )

    @callback
    def _async_paired(
        self, entry: ConfigEntry, data: dict[str, str], identity: str | None
    ) -> ConfigFlowResult:
        """Store a host's new address or key and the identity it proved; reload."""
        if identity is None:  # a Unix socket: no pairing
            return self._async_update_entry(entry, unique_id=None, data=data)
        other = self.hass.config_entries.async_entry_for_domain_unique_id(
            DOMAIN, identity
        )
        if other is not None and other.entry_id != entry.entry_id:
            return self.async_abort(reason="host_already_configured")
        return self._async_update_entry(
            entry, unique_id=identity, data={**data, CONF_HOST_IDENTITY: identity}
        )

    @callback
    def _async_update_entry(
        self, entry: ConfigEntry, *, data: Mapping[str, Any], **changes: Any
    ) -> ConfigFlowResult:
        """Store a reconfigured or re-paired entry and set it up again.

        A loaded entry's update listener reloads it when something changed; any
        other entry is reloaded here (a retry or an error, it tries again).
        """
        if entry.update_listeners:
            return self.async_update_and_abort(entry, data=data, **changes)
        return self.async_update_reload_and_abort(entry, data=data, **changes)

    @classmethod
    @callback
    def async_get_supported_subentry_types(
        cls, config_entry: ConfigEntry
    ) -> dict[str, type[ConfigSubentryFlow]]:
        """Return the subentry types: conversation agents and AI Task agents."""
        return {
            SUBENTRY_CONVERSATION: ConversationFlowHandler,
            SUBENTRY_AI_TASK: AITaskFlowHandler,
        }


async def async_scan_or_abort(
    entry: ConfigEntry, placeholders: dict[str, str]
) -> tuple[ModelScan, bool]:
    """Ask the entry's host for its models and whether they are simulated.

    Aborts the flow when the entry is not loaded, its models folder is unusable
    or holds no model; placeholders gets the folder (the host's path).
    """
    runtime = getattr(entry, "runtime_data", None)
    if entry.state is not ConfigEntryState.LOADED or runtime is None:
        raise AbortFlow("entry_not_loaded")
    host = runtime.engine.host
    placeholders[CONF_MODELS_DIR] = str(host.hello.get("models_dir", ""))
    try:
        scan = await host.async_scan()
    except ModelsDirError as err:
        raise AbortFlow(err.reason, placeholders) from err
    if not scan.models:
        raise AbortFlow("no_models", placeholders)
    return scan, host.simulated


def _context_limit(entry: ConfigEntry, model: str) -> int | None:
    """Return the model's context limit, known once the runtime has loaded it."""
    runtime = getattr(entry, "runtime_data", None)
    session = runtime.engine.sessions.get(model) if runtime is not None else None
    return session.worker.context_limit if session is not None else None


def _loaded_agent(entry: ConfigEntry, flow: ConfigSubentryFlow) -> Agent | None:
    """Return the running agent a reconfigure flow changes (None: a new one)."""
    if flow.source == SOURCE_USER:
        return None
    runtime = getattr(entry, "runtime_data", None)
    agents: dict[str, Agent] = runtime.agents if runtime is not None else {}
    return agents.get(flow._get_reconfigure_subentry().subentry_id)  # noqa: SLF001


def _model_limits(entry: ConfigEntry, models: Mapping[str, ModelInfo]) -> str:
    """Say the context limit of each model the runtime has loaded (a form's line)."""
    known = [
        f"{model}: {_format_tokens(limit)} tokens"
        for model in models
        if (limit := _context_limit(entry, model)) is not None
    ]
    return "; ".join(known) or "-"


class ConversationFlowHandler(ConfigSubentryFlow):
    """Add or change a conversation agent."""

    _chat = True
    _subentry_type = SUBENTRY_CONVERSATION

    @property
    def _is_new(self) -> bool:
        """Return True when adding an agent."""
        return self.source == SOURCE_USER

    async def async_step_set_options(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """Show and store the agent options."""
        entry = self._get_entry()
        if entry.state is not ConfigEntryState.LOADED:
            return self.async_abort(reason="entry_not_loaded")
        errors: dict[str, str] = {}
        limits: dict[str, str] = {}
        if user_input is not None:
            limit = _context_limit(entry, user_input[CONF_MODEL])
            name = user_input.get(CONF_NAME, "").strip()
            if limit is not None and int(user_input[CONF_MAX_CONTEXT_LEN]) > limit:
                errors[CONF_MAX_CONTEXT_LEN] = "context_above_model_limit"
                limits["limit"] = str(limit)
            elif name and name in self._taken_names():
                errors[CONF_NAME] = "name_in_use"
            else:
                return self._async_save(user_input)

        placeholders: dict[str, str] = {}
        scan, simulated = await async_scan_or_abort(entry, placeholders)
        prompt = await self.hass.async_add_executor_job(_read_default_prompt)
        options = _default_agent_options(
            next(iter(scan.models)), prompt, chat=self._chat
        )
        if not self._is_new:
            data = self._get_reconfigure_subentry().data
            options |= data
            options[CONF_LLM_HASS_API] = data.get(CONF_LLM_HASS_API, [])
        if user_input is not None:
            options |= user_input
        known_apis = {api.id for api in llm.async_get_apis(self.hass)}
        options[CONF_LLM_HASS_API] = [
            api for api in options[CONF_LLM_HASS_API] if api in known_apis
        ]
        options.setdefault(CONF_TOOL_GROUPS, [group.value for group in ToolGroup])
        placeholders["tool_costs"] = (
            costs_text(
                await async_group_costs(self.hass, options, _loaded_agent(entry, self))
            )
            if self._chat
            else ""
        )
        return self.async_show_form(
            step_id="set_options" if self._is_new else "reconfigure",
            data_schema=self.add_suggested_values_to_schema(
                _agent_schema(
                    self.hass,
                    scan.models,
                    is_new=self._is_new,
                    chat=self._chat,
                    simulated=simulated,
                ),
                options,
            ),
            errors=errors,
            description_placeholders={
                **placeholders,
                "model_limits": _model_limits(entry, scan.models),
                **limits,
            },
        )

    def _taken_names(self) -> set[str]:
        """Names of the entry's agents (a new one must differ from them)."""
        return {subentry.title for subentry in self._get_entry().subentries.values()}

    async_step_user = async_step_set_options
    async_step_reconfigure = async_step_set_options

    @callback
    def _async_save(self, user_input: dict[str, Any]) -> SubentryFlowResult:
        """Create or update the agent from the submitted options."""
        data = dict(user_input)
        name = data.pop(CONF_NAME, "").strip() or default_agent_name(
            data[CONF_MODEL], self._subentry_type, self._taken_names()
        )
        if self._chat:
            data.setdefault(CONF_PROMPT, "")
        if set(data.get(CONF_TOOL_GROUPS, ToolGroup)) >= set(ToolGroup):
            data.pop(CONF_TOOL_GROUPS, None)  # every group: what HA offers
        if not data.get(CONF_LLM_HASS_API):
            data.pop(CONF_LLM_HASS_API, None)
        if self._is_new:
            return self.async_create_entry(title=name, data=data)
        return self.async_update_and_abort(
            self._get_entry(), self._get_reconfigure_subentry(), data=data
        )


class AITaskFlowHandler(ConversationFlowHandler):
    """Add or change an AI Task agent (data generation, no tools or history)."""

    _chat = False
    _subentry_type = SUBENTRY_AI_TASK
