"""Actions: rebuild_cache, list_caches, create_cache, delete_cache, benchmark."""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from homeassistant.components.conversation import DOMAIN as CONVERSATION_DOMAIN
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import CONF_NAME
from homeassistant.core import (
    HomeAssistant,
    ServiceCall,
    ServiceResponse,
    SupportsResponse,
    callback,
)
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.helpers import config_validation as cv, entity_registry as er
from homeassistant.helpers.service import (
    async_register_admin_service,
    async_set_service_schema,
)
from homeassistant.util.hass_dict import HassKey
from homeassistant.util.yaml import load_yaml_dict

from .action_checks import check_cache_prompt_fits, check_question_fits
from .const import CONF_MODEL, CONF_PROMPT, DOMAIN, SYSTEM_CACHE_NAME
from .errors import generation_failed, refuse_nul
from .ha_compat import vol
from .host.prompt_cache import (
    CACHE_NAME_PATTERN,
    CacheBudgetExceeded,
    CacheDeleteError,
    CacheEntry,
    CacheError,
    CacheTooLong,
    CacheWriteError,
)
from .host.rkllm.errors import RKLLMError
from .run_planner import NO_TOOLS, SystemPrefix

if TYPE_CHECKING:
    from . import RockchipRuntime
    from .agent import Agent
    from .system_cache import SystemCacheKeeper

SERVICE_REBUILD_CACHE = "rebuild_cache"
SERVICE_LIST_CACHES = "list_caches"
SERVICE_CREATE_CACHE = "create_cache"
SERVICE_DELETE_CACHE = "delete_cache"
SERVICE_BENCHMARK = "benchmark"
ATTR_AGENT = "agent"
ATTR_ASSIST_TOOLS = "assist_tools"
ATTR_RUNS = "runs"
ATTR_QUESTION = "question"
DEFAULT_QUESTION = "Is the kitchen light on?"
MODEL_SERVICES = (SERVICE_LIST_CACHES, SERVICE_CREATE_CACHE, SERVICE_DELETE_CACHE)
_DESCRIPTIONS: HassKey[dict[str, Any]] = HassKey(f"{DOMAIN}_service_descriptions")
_CACHE_NAMES: HassKey[list[str]] = HassKey(f"{DOMAIN}_cache_names")
"""Names of the stored caches, offered by delete_cache's name field."""

REBUILD_SCHEMA = vol.Schema(
    {
        vol.Optional(ATTR_AGENT): cv.entity_ids,
        vol.Optional(CONF_NAME): cv.string,
    }
)
LIST_SCHEMA = vol.Schema({vol.Optional(CONF_MODEL): cv.string})
CREATE_SCHEMA = vol.Schema(
    {
        vol.Required(CONF_MODEL): cv.string,
        vol.Required(CONF_NAME): cv.string,
        vol.Required(CONF_PROMPT): cv.string,
        vol.Optional(ATTR_ASSIST_TOOLS, default=True): cv.boolean,
    }
)
BENCHMARK_SCHEMA = vol.Schema(
    {
        vol.Required(ATTR_AGENT): cv.entity_id,
        vol.Optional(ATTR_RUNS, default=3): vol.All(
            vol.Coerce(int), vol.Range(min=1, max=20)
        ),
        vol.Optional(ATTR_QUESTION, default=DEFAULT_QUESTION): cv.string,
    }
)
DELETE_SCHEMA = vol.Schema(
    {vol.Required(CONF_MODEL): cv.string, vol.Required(CONF_NAME): cv.string}
)


def _runtimes(hass: HomeAssistant) -> list[RockchipRuntime]:
    return [
        entry.runtime_data
        for entry in hass.config_entries.async_entries(DOMAIN)
        if entry.state is ConfigEntryState.LOADED
    ]


def _validation_error(key: str, **placeholders: str) -> ServiceValidationError:
    return ServiceValidationError(
        translation_domain=DOMAIN,
        translation_key=key,
        translation_placeholders=placeholders,
    )


def cache_build_error[E: HomeAssistantError](
    kind: type[E], model: str, err: Exception
) -> E:
    """Return a translated error that says why a cache build failed.

    The disk (full, read-only) and a prompt that may not fit the context get
    messages of their own; anything else is reported as it is.
    """
    key = "cache_build_failed"
    placeholders = {"error": str(err)}
    if isinstance(err, CacheTooLong):
        key, placeholders = err.translation_key, err.placeholders
    elif isinstance(err, CacheWriteError) and err.disk_problem is not None:
        key, placeholders = err.disk_problem, err.placeholders
    return kind(
        translation_domain=DOMAIN,
        translation_key=key,
        translation_placeholders={"model": model, **placeholders},
    )


def _check_name(name: str) -> None:
    if not CACHE_NAME_PATTERN.fullmatch(name):
        raise _validation_error("invalid_cache_name", name=name)


class _ChatAgent(NamedTuple):
    """A conversation agent, its system prompt cache and the entry it belongs to."""

    runtime: RockchipRuntime
    agent: Agent
    system_cache: SystemCacheKeeper


def _chat_agents(runtime: RockchipRuntime) -> dict[str, _ChatAgent]:
    return {
        subentry_id: _ChatAgent(runtime, runtime.agents[subentry_id], system_cache)
        for subentry_id, system_cache in runtime.system_caches.items()
    }


def _agents_for(hass: HomeAssistant, entity_ids: list[str] | None) -> list[_ChatAgent]:
    """Return the conversation agents of entity_ids (None: all of them)."""
    by_subentry = {
        subentry_id: chat_agent
        for runtime in _runtimes(hass)
        for subentry_id, chat_agent in _chat_agents(runtime).items()
    }
    if entity_ids is None:
        if not by_subentry:
            raise _validation_error("no_agents")
        return list(by_subentry.values())
    registry = er.async_get(hass)
    found: list[_ChatAgent] = []
    for entity_id in entity_ids:
        entity = registry.async_get(entity_id)
        chat_agent = (
            by_subentry.get(entity.config_subentry_id)
            if entity is not None
            and entity.platform == DOMAIN
            and entity.config_subentry_id is not None
            else None
        )
        if chat_agent is None:
            raise _validation_error("unknown_agent", agent=entity_id)
        found.append(chat_agent)
    return found


def _check_loaded(hass: HomeAssistant) -> None:
    """Raise a validation error while an entry is not loaded (starting, failed)."""
    for entry in hass.config_entries.async_entries(DOMAIN):
        if entry.state is not ConfigEntryState.LOADED:
            raise _validation_error(
                "entry_not_loaded", title=entry.title, state=entry.state.value
            )


def _refuse_agents_cache(
    hass: HomeAssistant, model: str, name: str, key: str, asking: Agent | None = None
) -> None:
    """Refuse a name that is the system cache of an agent (other than asking) of model.

    The agents keep their own caches: a cache of another prompt under that name
    would be overwritten, or leave the agent without its cache.
    """
    for runtime in _runtimes(hass):
        for subentry_id, system_cache in runtime.system_caches.items():
            agent = runtime.agents[subentry_id]
            if (
                agent.session.name == model
                and system_cache.name == name
                and agent is not asking
            ):
                raise _validation_error(key, model=model, name=name, agent=agent.title)


def _agent_for_model(hass: HomeAssistant, model: str) -> Agent:
    for runtime in _runtimes(hass):
        for agent in runtime.agents.values():
            if agent.session.name == model:
                return agent
    _check_loaded(hass)
    raise _validation_error("model_not_loaded", model=model)


def _entry_json(entry: CacheEntry) -> dict[str, Any]:
    metadata = entry.metadata
    return {
        "model": entry.model,
        "name": entry.name,
        **(metadata.to_json() if metadata is not None else {}),
        "problem": entry.problem,
    }


@contextlib.contextmanager
def _build_errors(model: str) -> Iterator[None]:
    """Report a failed cache build of model with a translated error.

    A cache the disk budget cannot take, or a prompt the context may not hold,
    is the caller's (a validation error); anything else is an internal failure.
    """
    try:
        yield
    except (RKLLMError, CacheError) as err:
        kind = (
            ServiceValidationError
            if isinstance(err, (CacheBudgetExceeded, CacheTooLong))
            else HomeAssistantError
        )
        raise cache_build_error(kind, model, err) from err


async def _async_rebuild_cache(call: ServiceCall) -> ServiceResponse:
    name: str | None = call.data.get(CONF_NAME)
    if name is not None:
        _check_name(name)
    caches = []
    registry = er.async_get(call.hass)
    chat_agents = _agents_for(call.hass, call.data.get(ATTR_AGENT))
    if name is not None:
        for _runtime, agent, _system_cache in chat_agents:
            _refuse_agents_cache(
                call.hass, agent.session.name, name, "cache_reserved_rebuild", agent
            )
    for _runtime, agent, system_cache in chat_agents:
        with _build_errors(agent.session.name):
            entry = await system_cache.async_rebuild(
                name or system_cache.name, SERVICE_REBUILD_CACHE
            )
        metadata = entry.metadata
        assert metadata is not None
        caches.append(
            {
                "agent": registry.async_get_entity_id(
                    CONVERSATION_DOMAIN, DOMAIN, agent.subentry_id
                ),
                "model": metadata.model,
                "name": metadata.name,
                "tokens": metadata.tokens,
                "size_bytes": metadata.size_bytes,
                "build_ms": metadata.build_ms,
                "prompt_sha256": metadata.prompt_sha256,
                "created_at": metadata.created_at,
            }
        )
    await async_refresh_cache_names(call.hass)
    return cast("ServiceResponse", {"caches": caches}) if call.return_response else None


async def _async_list_caches(call: ServiceCall) -> ServiceResponse:
    model: str | None = call.data.get(CONF_MODEL)
    if model is None:
        _check_loaded(call.hass)
        if not _runtimes(call.hass):
            raise _validation_error("no_agents")
    else:
        _agent_for_model(call.hass, model)
    results: list[dict[str, Any]] = []
    folders: list[dict[str, Any]] = []
    for runtime in _runtimes(call.hass):
        engine = runtime.engine
        await runtime.disk_repair.async_check()  # an occasion to withdraw it
        try:
            listing = await engine.store.async_list_sized(model)
            folders.append(await engine.store.async_usage())
        except CacheError as err:
            raise _validation_error(err.translation_key, **err.placeholders) from err
        for entry, disk_bytes in listing:
            problem = entry.problem
            if problem is None:
                problem = _cache_problem(runtime, entry)
            results.append(
                {
                    **_entry_json(entry),
                    "disk_bytes": disk_bytes,
                    "valid": problem is None,
                    "problem": problem,
                }
            )
        results.extend(
            {
                "model": name,
                "name": SYSTEM_CACHE_NAME,
                "problem": "not_saved_by_runtime",
                "error": session.cache_unsupported,
                "valid": False,
            }
            for name, session in engine.sessions.items()
            if session.cache_unsupported is not None and model in (None, name)
        )
    return cast("ServiceResponse", {"caches": results, "cache_dirs": folders})


def _cache_problem(runtime: RockchipRuntime, entry: CacheEntry) -> str | None:
    """Why a readable cache serves none of its model's agents (None: it serves one)."""
    checks = runtime.cache_checks(entry)
    if any(reason is None for reason in checks.values()):
        return None
    if checks:
        return next(iter(checks.values()))
    chat_models = {agent.session.name for agent in runtime.chat_agents}
    if entry.model in chat_models:
        return "agent_not_ready"
    return "model_not_loaded" if entry.model in runtime.scan.models else "model_missing"


async def _async_create_cache(call: ServiceCall) -> ServiceResponse:
    name: str = call.data[CONF_NAME]
    _check_name(name)
    refuse_nul(call.data[CONF_PROMPT], CONF_PROMPT)
    agent = _agent_for_model(call.hass, call.data[CONF_MODEL])
    _refuse_agents_cache(call.hass, agent.session.name, name, "cache_reserved_create")
    tools = (
        _assist_tools(call.hass, agent.session.name)
        if call.data[ATTR_ASSIST_TOOLS]
        else NO_TOOLS
    )
    prefix = SystemPrefix(prompt=call.data[CONF_PROMPT], tools_json=tools)
    check_cache_prompt_fits(agent.session, name, prefix)
    with _build_errors(agent.session.name):
        entry = await agent.session.async_build_cache(
            prefix, name, SERVICE_CREATE_CACHE
        )
    await async_refresh_cache_names(call.hass)
    if not call.return_response:
        return None
    return {"cache": _entry_json(entry) | {ATTR_ASSIST_TOOLS: prefix.has_tools}}


def _assist_tools(hass: HomeAssistant, model: str) -> str:
    """Return the tools a conversation agent of model puts before its prompt."""
    for runtime in _runtimes(hass):
        for agent in runtime.chat_agents:
            prefix = agent.system_cache.prefix if agent.system_cache else None
            if agent.session.name == model and prefix is not None:
                return prefix.tools_json
    return NO_TOOLS


async def _async_delete_cache(call: ServiceCall) -> ServiceResponse:
    name: str = call.data[CONF_NAME]
    model: str = call.data[CONF_MODEL]
    _check_name(name)
    agent = _agent_for_model(call.hass, model)
    _refuse_agents_cache(call.hass, model, name, "cache_reserved_delete")
    try:
        stored = await agent.session.services.store.async_list(model)
        deleted = await agent.session.async_delete_cache(name)
    except CacheDeleteError as err:
        agent.session.services.on_cache_write(err)  # the disk's repair, if it is that
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="cache_delete_not_writable"
            if err.disk_problem == "cache_dir_not_writable"
            else err.translation_key,
            translation_placeholders=err.placeholders,
        ) from err
    except CacheError as err:
        raise _validation_error(err.translation_key, **err.placeholders) from err
    if not deleted:
        raise _validation_error("cache_not_found", model=model, name=name)
    await async_refresh_cache_names(call.hass)
    if not call.return_response:
        return None
    removed = next((entry for entry in stored if entry.name == name), None)
    return {
        "deleted": _entry_json(removed)
        if removed is not None
        else {"model": model, "name": name}
    }


async def _async_benchmark(call: ServiceCall) -> ServiceResponse:
    refuse_nul(call.data[ATTR_QUESTION], ATTR_QUESTION)
    [(runtime, agent, system_cache)] = _agents_for(call.hass, [call.data[ATTR_AGENT]])
    prefix, cache = system_cache.prefix, system_cache.cache
    if prefix is None or cache is None:
        raise _validation_error("cache_not_ready", agent=call.data[ATTR_AGENT])
    check_question_fits(
        agent.session,
        call.data[ATTR_AGENT],
        cache,
        call.data[ATTR_QUESTION],
        agent.settings.max_new_tokens,
    )
    try:
        result = await agent.session.async_benchmark(
            prefix,
            cache,
            question=call.data[ATTR_QUESTION],
            runs=call.data[ATTR_RUNS],
            max_new_tokens=agent.settings.max_new_tokens,
        )
    except RKLLMError as err:
        raise generation_failed(err) from err
    simulated = runtime.engine.host.simulated
    return cast("ServiceResponse", result | {"simulated": simulated})


async def async_setup_services(hass: HomeAssistant) -> None:
    """Register the integration's actions.

    Those that write files or hold the NPU are for administrators only, as core's
    are; listing the caches is open to every user.
    """
    hass.services.async_register(
        DOMAIN,
        SERVICE_LIST_CACHES,
        _async_list_caches,
        schema=LIST_SCHEMA,
        supports_response=SupportsResponse.ONLY,
    )
    for name, handler, schema, supports_response in (
        (
            SERVICE_REBUILD_CACHE,
            _async_rebuild_cache,
            REBUILD_SCHEMA,
            SupportsResponse.OPTIONAL,
        ),
        (
            SERVICE_CREATE_CACHE,
            _async_create_cache,
            CREATE_SCHEMA,
            SupportsResponse.OPTIONAL,
        ),
        (
            SERVICE_DELETE_CACHE,
            _async_delete_cache,
            DELETE_SCHEMA,
            SupportsResponse.OPTIONAL,
        ),
        (SERVICE_BENCHMARK, _async_benchmark, BENCHMARK_SCHEMA, SupportsResponse.ONLY),
    ):
        async_register_admin_service(
            hass, DOMAIN, name, handler, schema, supports_response
        )
    hass.data[_DESCRIPTIONS] = await hass.async_add_executor_job(
        load_yaml_dict, str(Path(__file__).with_name("services.yaml"))
    )
    await async_refresh_cache_names(hass)


@callback
def async_update_model_selectors(hass: HomeAssistant) -> None:
    """Offer the loaded models now, and the stored caches once they are listed."""
    _async_set_selectors(hass)
    hass.async_create_task(async_refresh_cache_names(hass))


async def async_refresh_cache_names(hass: HomeAssistant) -> None:
    """List the stored caches of the loaded entries for delete_cache's name field."""
    names: set[str] = set()
    for runtime in _runtimes(hass):
        with contextlib.suppress(CacheError, RKLLMError):  # the host may be gone
            entries = await runtime.engine.store.async_list()
            names.update(entry.name for entry in entries)
    hass.data[_CACHE_NAMES] = sorted(names)
    _async_set_selectors(hass)


@callback
def _async_set_selectors(hass: HomeAssistant) -> None:
    """Offer the loaded models and the stored cache names as lists in the UI."""
    models = sorted(
        {agent.session.name for r in _runtimes(hass) for agent in r.agents.values()}
    )
    for service in MODEL_SERVICES:
        description = copy.deepcopy(hass.data[_DESCRIPTIONS][service])
        description["fields"][CONF_MODEL]["selector"] = {
            "select": {"options": models, "mode": "dropdown"}
        }
        if service == SERVICE_DELETE_CACHE:
            description["fields"][CONF_NAME]["selector"] = {
                "select": {
                    "options": hass.data.get(_CACHE_NAMES, []),
                    "mode": "dropdown",
                    "custom_value": True,
                }
            }
        async_set_service_schema(hass, DOMAIN, service, description)
