"""The Rockchip LLM integration: Assist on the Rockchip NPU through the RKLLM runtime."""

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from homeassistant.components.conversation import (
    DOMAIN as CONVERSATION_DOMAIN,
    ConverseError,
)
from homeassistant.components.homeassistant.exposed_entities import (
    async_listen_entity_updates,
)
from homeassistant.config_entries import ConfigEntry, ConfigEntryState, ConfigSubentry
from homeassistant.const import EVENT_HOMEASSISTANT_STOP, Platform
from homeassistant.core import Event, HomeAssistant, callback
from homeassistant.exceptions import ConfigEntryError, ConfigEntryNotReady
from homeassistant.helpers import (
    area_registry as ar,
    config_validation as cv,
    device_registry as dr,
    entity_registry as er,
    issue_registry as ir,
)
from homeassistant.helpers.start import async_at_started
from homeassistant.helpers.typing import ConfigType

from .agent import Agent, AgentSettings
from .agent_state import (
    AGENT_ISSUE_KIND,
    AgentFailure,
    AgentProblem,
    load_failure,
    running_failure,
)
from .cache_repair import CacheDiskRepair, async_report_cache_write
from .connect import async_connect_host
from .const import (
    CONF_MODEL,
    CONTEXT_FOLLOWS_MODEL,
    DOMAIN,
    LOGGER,
    MAX_SAFE_CONTEXT_LEN,
    SUBENTRY_AI_TASK,
    SUBENTRY_CONVERSATION,
)
from .engine import Engine, plan_domains
from .host.board import npu_driver_too_old
from .host.model_files import ModelInfo, ModelScan, ModelsDirError
from .host.prompt_cache import CacheEntry, CacheError, CacheWriteError
from .host.rkllm.errors import (
    LibraryChanged,
    LibraryCopyFailed,
    LibraryError,
    LibraryNotFound,
    ModelInitError,
    RKLLMError,
)
from .host.rkllm.library import RuntimeInfo
from .host.rkllm.runtime import ModelParams
from .host.wire import HostLost
from .host_device import async_register_host_device
from .model_limits import ModelLimits, async_get_model_limits
from .prefix_report import async_report_fit
from .remote import RuntimeHost
from .services import async_setup_services, async_update_model_selectors
from .session import ModelSession
from .system_cache import PrefixDoesNotFit, SystemCacheKeeper, system_cache_name

CONFIG_SCHEMA = cv.config_entry_only_config_schema(DOMAIN)
AGENT_SUBENTRIES = (SUBENTRY_CONVERSATION, SUBENTRY_AI_TASK)
PLATFORMS = (
    Platform.AI_TASK,
    Platform.BINARY_SENSOR,
    Platform.CONVERSATION,
    Platform.SENSOR,
)


@dataclass(slots=True)
class RockchipRuntime:
    """What a loaded config entry holds."""

    engine: Engine
    scan: ModelScan
    host_device: dr.DeviceEntry
    """The host's device: the agents' devices run through it."""
    disk_repair: CacheDiskRepair
    agents: dict[str, Agent] = field(default_factory=dict)
    failures: dict[str, AgentFailure] = field(default_factory=dict)
    """Why each agent that was not set up is not, by subentry id."""

    def failure(self, subentry_id: str) -> AgentFailure | None:
        """Why an agent cannot answer (None: it can)."""
        if (agent := self.agents.get(subentry_id)) is None:
            return self.failures.get(subentry_id)
        return running_failure(agent)

    @property
    def chat_agents(self) -> list[Agent]:
        """The conversation agents (those with a system cache)."""
        return [agent for agent in self.agents.values() if agent.chat]

    def cache_checks(self, entry: CacheEntry) -> dict[str, str | None]:
        """Check a stored cache against each conversation agent of its model.

        By subentry id: None where the cache serves the agent's current system
        prefix, else why not. Agents not prepared yet are left out.
        """
        return {
            subentry_id: entry.invalid_reason(
                self.agents[subentry_id].session.expectation(system_cache.prefix)
            )
            for subentry_id, system_cache in self.system_caches.items()
            if system_cache.prefix is not None
            and self.agents[subentry_id].session.name == entry.model
        }

    @property
    def system_caches(self) -> dict[str, SystemCacheKeeper]:
        """The system prompt caches of the conversation agents, by subentry id."""
        return {
            subentry_id: agent.system_cache
            for subentry_id, agent in self.agents.items()
            if agent.system_cache is not None
        }


type RockchipConfigEntry = ConfigEntry[RockchipRuntime]


async def async_setup(hass: HomeAssistant, config: ConfigType) -> bool:
    """Register the actions."""
    await async_setup_services(hass)
    return True


async def async_setup_entry(hass: HomeAssistant, entry: RockchipConfigEntry) -> bool:
    """Connect to the runtime host, load the agents' models and their system caches."""
    host = await async_connect_host(hass, entry)
    host_device = async_register_host_device(hass, entry, host)
    try:
        runtime = _check_library(hass, entry, host)
        _check_npu_driver(hass, host.board.get("npu_driver_version"))
        try:
            scan = await host.async_scan()
        except ModelsDirError as err:
            raise ConfigEntryNotReady(
                translation_domain=DOMAIN,
                translation_key=err.reason,
                translation_placeholders={"path": str(err.path)},
            ) from err
        disk_repair = CacheDiskRepair(hass, entry.entry_id, host.store)
        engine = Engine(
            host,
            runtime,
            disk_repair.report,
            partial(_async_model_down, hass, entry, host),
        )
        runtime_data = RockchipRuntime(
            engine=engine,
            scan=scan,
            host_device=host_device,
            disk_repair=disk_repair,
        )
        disk_repair.on_cleared = partial(_async_refresh_system_caches, runtime_data)
        try:
            await _async_load_agents(hass, entry, runtime_data)
        except BaseException:
            await engine.async_close()
            raise
    except BaseException:
        await host.async_close()
        raise
    entry.runtime_data = runtime_data
    entry.async_on_unload(disk_repair.async_start())
    entry.async_on_unload(host.on_lost(partial(_async_host_lost, hass, entry)))
    entry.async_on_unload(
        hass.bus.async_listen(
            EVENT_HOMEASSISTANT_STOP, partial(_async_stop_host, runtime_data)
        )
    )
    _async_track_prefix_sources(hass, entry, runtime_data)
    await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    entry.async_on_unload(entry.add_update_listener(_async_update_listener))
    entry.async_on_unload(
        entry.async_on_state_change(lambda: async_update_model_selectors(hass))
    )
    return True


@callback
def _async_host_lost(
    hass: HomeAssistant, entry: RockchipConfigEntry, error: HostLost
) -> None:
    """Set the entry up again: it waits (with backoff) until the host answers.

    An entry being unloaded (a reload under way) connects anew anyway; one being
    set up is reloaded once its set-up ends, as a loaded one.
    """
    if entry.state is ConfigEntryState.UNLOAD_IN_PROGRESS:
        LOGGER.info("The link to the runtime host ended while unloading: %s", error)
        return
    LOGGER.warning("Reconnecting to the runtime host: %s", error)
    hass.config_entries.async_schedule_reload(entry.entry_id)


async def _async_stop_host(runtime: RockchipRuntime, _event: Event) -> None:
    """Stop the models and close the link when Home Assistant stops."""
    await runtime.engine.async_close()
    await runtime.engine.host.async_close()


def _check_library(
    hass: HomeAssistant, entry: RockchipConfigEntry, host: RuntimeHost
) -> RuntimeInfo:
    """Return the host's checked runtime library, or raise why it has none."""
    library_issue = f"library_{entry.entry_id}"
    library_path = host.hello.get("library_path", "")
    runtime, err = host.runtime, host.library_error()
    if runtime is not None and err is None:
        ir.async_delete_issue(hass, DOMAIN, library_issue)
        return runtime
    if not isinstance(err, LibraryError):
        err = LibraryError(str(err) or "the runtime host has no usable library")
    if isinstance(err, LibraryCopyFailed):
        # The cache folder's disk is full or read-only: retried, with its repair.
        async_report_cache_write(hass, entry.entry_id, host.library_copy_problem())
        raise ConfigEntryNotReady(
            translation_domain=DOMAIN,
            translation_key=err.translation_key,
            translation_placeholders=err.placeholders,
        ) from err
    missing = isinstance(err, LibraryNotFound)
    _async_create_issue(
        hass,
        library_issue,
        "library_missing" if missing else "library_unusable",
        {"path": str(library_path), "error": str(err)},
    )
    not_ready = ConfigEntryNotReady if missing else ConfigEntryError
    raise not_ready(
        translation_domain=DOMAIN,
        translation_key=err.translation_key,
        translation_placeholders=err.placeholders,
    ) from err


def _model_params(
    info_path: Path,
    settings: list[AgentSettings],
    domain_id: int,
    limit: int | None = None,
) -> ModelParams:
    """Init parameters that serve every agent sharing a model.

    An agent whose context follows the model asks for the model's limit (when
    known) up to MAX_SAFE_CONTEXT_LEN.
    """
    first = settings[0]
    follows = min(limit or MAX_SAFE_CONTEXT_LEN, MAX_SAFE_CONTEXT_LEN)
    return ModelParams(
        model_path=info_path,
        max_context_len=max(
            s.max_context_len if s.max_context_len != CONTEXT_FOLLOWS_MODEL else follows
            for s in settings
        ),
        max_new_tokens=max(s.max_new_tokens for s in settings),
        sampling=first.sampling,
        base_domain_id=domain_id,
    )


async def _async_load_agents(
    hass: HomeAssistant, entry: RockchipConfigEntry, runtime: RockchipRuntime
) -> None:
    """Load each agent's model (shared per model) and prepare its system cache."""
    _async_clear_agent_issues(hass, entry)
    by_model: dict[str, list[str]] = {}
    for subentry in entry.subentries.values():
        if subentry.subentry_type not in AGENT_SUBENTRIES:
            continue
        model = subentry.data[CONF_MODEL]
        issue_id = f"model_missing_{subentry.subentry_id}"
        if model not in runtime.scan.models:
            LOGGER.error("Model folder %r of agent %r is gone", model, subentry.title)
            runtime.failures[subentry.subentry_id] = AgentFailure(
                AgentProblem.MODEL_MISSING,
                f"the model folder {model!r} is not in the models folder",
            )
            _async_create_issue(
                hass,
                issue_id,
                "model_missing",
                {"model": model, "agent": subentry.title},
                fix_data={
                    "entry_id": entry.entry_id,
                    "subentry_id": subentry.subentry_id,
                },
            )
            continue
        ir.async_delete_issue(hass, DOMAIN, issue_id)
        by_model.setdefault(model, []).append(subentry.subentry_id)

    chat_models: set[str] = set()
    limits = await async_get_model_limits(hass)
    domains = plan_domains(
        [runtime.scan.models[model].size_bytes for model in by_model]
    )
    for domain_id, (model, subentry_ids) in zip(domains, by_model.items(), strict=True):
        settings = [
            AgentSettings.from_options(entry.subentries[i].data) for i in subentry_ids
        ]
        info = runtime.scan.models[model]
        params = _model_params(info.path, settings, domain_id, limits.get(info))
        for subentry_id in subentry_ids:
            subentry = entry.subentries[subentry_id]
            try:
                session = await _async_acquire(runtime, limits, info, params, settings)
            except RKLLMError as err:
                # Only this model's agents are down; the others and the entry stay up
                # (and the agents editable). A reload tries again.
                runtime.failures[subentry_id] = load_failure(err)
                _async_agent_failed(hass, entry, subentry, err)
                continue
            chat = subentry.subentry_type == SUBENTRY_CONVERSATION
            runtime.agents[subentry_id] = Agent(
                hass,
                session,
                subentry_id,
                subentry.data,
                chat=chat,
                title=subentry.title,
                system_cache_name=system_cache_name(
                    subentry_id, first_on_model=chat and model not in chat_models
                ),
            )
            if chat:
                chat_models.add(model)
    disk_failed = False
    for subentry_id, system_cache in runtime.system_caches.items():
        agent = runtime.agents[subentry_id]
        system_cache.on_fit_changed = partial(_async_fit_changed, hass, entry, agent)
        try:
            await system_cache.async_prepare("setup")
        except PrefixDoesNotFit as err:
            # Its repair is raised; the agent stays, its entities tell the numbers.
            LOGGER.error("Agent %r cannot answer: %s", agent.title, err)
        except (RKLLMError, CacheError, ConverseError, OSError) as err:
            if isinstance(err, CacheWriteError) and err.disk_problem is not None:
                # The repair is raised; the agent answers without a cache meanwhile.
                LOGGER.warning(
                    "%s runs without a prompt cache: %s", agent.session.name, err
                )
                disk_failed = True
                continue
            _async_agent_failed(
                hass,
                entry,
                entry.subentries[agent.subentry_id],
                err,
                agent.session.name,
            )
            runtime.agents.pop(agent.subentry_id).shutdown()
            runtime.failures[agent.subentry_id] = AgentFailure(
                AgentProblem.PREPARE_FAILED, str(err) or type(err).__name__
            )
    if not disk_failed:
        await runtime.disk_repair.async_check()


@callback
def _async_fit_changed(
    hass: HomeAssistant, entry: RockchipConfigEntry, agent: Agent
) -> None:
    """Report how the agent's prefix fits; its entities follow whether it can answer."""
    async_report_fit(hass, entry.entry_id, entry.title, agent)
    agent.session.notify()


async def _async_acquire(
    runtime: RockchipRuntime,
    limits: ModelLimits,
    info: ModelInfo,
    params: ModelParams,
    settings: list[AgentSettings],
) -> ModelSession:
    """Load a model; a context that follows it retries at the limit it names."""
    try:
        session = await runtime.engine.async_acquire(info, params)
    except ModelInitError as err:
        if "limit" not in err.placeholders:
            raise
        limit = int(err.placeholders["limit"])
        retry = _model_params(info.path, settings, params.base_domain_id, limit)
        if retry.max_context_len >= params.max_context_len:
            raise
        LOGGER.info("%s holds %d tokens: loading it at that context", info.name, limit)
        session = await runtime.engine.async_acquire(info, retry)
    if (reported := session.worker.context_limit) is not None:
        limits.remember(info, reported)
    return session


def _agent_issue_prefix(entry: RockchipConfigEntry) -> str:
    return f"agent_failed_{entry.entry_id}_"


@callback
def _async_clear_agent_issues(hass: HomeAssistant, entry: RockchipConfigEntry) -> None:
    """Remove the entry's agent repairs (setup raises them again where still due)."""
    prefix = _agent_issue_prefix(entry)
    for domain, issue_id in list(ir.async_get(hass).issues):
        if domain == DOMAIN and issue_id.startswith(prefix):
            ir.async_delete_issue(hass, DOMAIN, issue_id)


@callback
def _async_agent_failed(
    hass: HomeAssistant,
    entry: RockchipConfigEntry,
    subentry: ConfigSubentry,
    err: Exception,
    model: str | None = None,
) -> None:
    """Report one agent that cannot run: logged, and a repair naming the reason."""
    model = model or subentry.data[CONF_MODEL]
    reason = str(err) or type(err).__name__
    LOGGER.error("Agent %r (model %s) is not available: %s", subentry.title, model, err)
    _async_create_issue(
        hass,
        f"{_agent_issue_prefix(entry)}{subentry.subentry_id}",
        "agent_failed",
        {
            "agent": subentry.title,
            "model": model,
            "entry": entry.title,
            "error": reason,
        },
        fix_data={
            "kind": AGENT_ISSUE_KIND,
            "entry_id": entry.entry_id,
            "subentry_id": subentry.subentry_id,
        },
    )


@callback
def _async_refresh_system_caches(runtime: RockchipRuntime) -> None:
    """Build the system caches that are missing (the disk takes them again)."""
    for system_cache in runtime.system_caches.values():
        system_cache.schedule_refresh()


@callback
def _async_model_down(
    hass: HomeAssistant,
    entry: RockchipConfigEntry,
    host: RuntimeHost,
    model: str,
    err: RKLLMError,
) -> None:
    """Say with a repair why a model stays down until a reload (which clears it).

    A changed library has the library's repair; a model given up, one per agent.
    """
    if isinstance(err, LibraryChanged):
        LOGGER.error("%s", err)
        _async_create_issue(
            hass,
            f"library_{entry.entry_id}",
            "library_changed",
            {"path": str(host.hello.get("library_path", "")), "error": str(err)},
        )
        return
    runtime: RockchipRuntime | None = getattr(entry, "runtime_data", None)
    if runtime is None:
        return  # during setup, which reports its agents that fail itself
    for subentry_id, agent in runtime.agents.items():
        if agent.session.name == model:
            _async_agent_failed(hass, entry, entry.subentries[subentry_id], err, model)


@callback
def _check_npu_driver(hass: HomeAssistant, driver: str | None) -> None:
    """Warn with a repair when the host reports an NPU driver older than 0.9.8."""
    if npu_driver_too_old(driver):
        LOGGER.warning("NPU driver %s is older than 0.9.8; RKLLM may fail", driver)
        _async_create_issue(
            hass,
            "npu_driver_old",
            "npu_driver_old",
            {"version": str(driver)},
            ir.IssueSeverity.WARNING,
        )
    else:
        ir.async_delete_issue(hass, DOMAIN, "npu_driver_old")


@callback
def _async_create_issue(
    hass: HomeAssistant,
    issue_id: str,
    key: str,
    placeholders: dict[str, str],
    severity: ir.IssueSeverity = ir.IssueSeverity.ERROR,
    *,
    fix_data: dict[str, str | int | float | None] | None = None,
) -> None:
    """Raise a repair issue the user can act on; with fix_data, repairs.py fixes it."""
    ir.async_create_issue(
        hass,
        DOMAIN,
        issue_id,
        is_fixable=fix_data is not None,
        data=fix_data,
        severity=severity,
        translation_key=key,
        translation_placeholders=placeholders,
    )


@callback
def _async_track_prefix_sources(
    hass: HomeAssistant, entry: RockchipConfigEntry, runtime: RockchipRuntime
) -> None:
    """Rebuild system caches when what the prompt is made of changes."""

    @callback
    def schedule(*_args: object) -> None:
        for system_cache in runtime.system_caches.values():
            system_cache.schedule_refresh()

    entry.async_on_unload(
        async_listen_entity_updates(hass, CONVERSATION_DOMAIN, schedule)
    )
    entry.async_on_unload(
        hass.bus.async_listen(er.EVENT_ENTITY_REGISTRY_UPDATED, schedule)
    )
    entry.async_on_unload(
        hass.bus.async_listen(ar.EVENT_AREA_REGISTRY_UPDATED, schedule)
    )

    async def refresh_after_start(_hass: HomeAssistant) -> None:
        # Other integrations' entities may exist only now: the prefix can differ.
        for system_cache in runtime.system_caches.values():
            await system_cache.async_refresh_now()

    entry.async_on_unload(async_at_started(hass, refresh_after_start))


async def async_unload_entry(hass: HomeAssistant, entry: RockchipConfigEntry) -> bool:
    """Abort generations, destroy the handles and join their threads."""
    if not await hass.config_entries.async_unload_platforms(entry, PLATFORMS):
        return False
    for agent in entry.runtime_data.agents.values():
        agent.shutdown()
    await entry.runtime_data.engine.async_close()
    await entry.runtime_data.engine.host.async_close()
    return True


async def _async_update_listener(
    hass: HomeAssistant, entry: RockchipConfigEntry
) -> None:
    """Reload when options or subentries change."""
    await hass.config_entries.async_reload(entry.entry_id)


async def async_remove_entry(hass: HomeAssistant, entry: RockchipConfigEntry) -> None:
    """Drop the repairs of the removed entry's agents."""
    _async_clear_agent_issues(hass, entry)
