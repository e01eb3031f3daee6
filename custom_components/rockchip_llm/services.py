"""Actions: rebuild_cache, list_caches, create_cache, delete_cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

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

from .benchmark import async_benchmark
from .chat import SystemPrefix
from .const import CONF_MODEL, CONF_PROMPT, DOMAIN, SYSTEM_CACHE_NAME
from .ha_compat import vol
from .prompt_cache import CACHE_NAME_PATTERN, CacheEntry, CacheError
from .rkllm.errors import RKLLMError

if TYPE_CHECKING:
    from . import RockchipRuntime
    from .agent import Agent

SERVICE_REBUILD_CACHE = "rebuild_cache"
SERVICE_LIST_CACHES = "list_caches"
SERVICE_CREATE_CACHE = "create_cache"
SERVICE_DELETE_CACHE = "delete_cache"
SERVICE_BENCHMARK = "benchmark"
ATTR_AGENT = "agent"
ATTR_RUNS = "runs"
ATTR_QUESTION = "question"
DEFAULT_QUESTION = "Is the kitchen light on?"

REBUILD_SCHEMA = vol.Schema(
    {
        vol.Optional(ATTR_AGENT): cv.entity_ids,
        vol.Optional(CONF_NAME, default=SYSTEM_CACHE_NAME): cv.string,
    }
)
LIST_SCHEMA = vol.Schema({vol.Optional(CONF_MODEL): cv.string})
CREATE_SCHEMA = vol.Schema(
    {
        vol.Required(CONF_MODEL): cv.string,
        vol.Required(CONF_NAME): cv.string,
        vol.Required(CONF_PROMPT): cv.string,
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


def _check_name(name: str) -> None:
    if not CACHE_NAME_PATTERN.fullmatch(name):
        raise _validation_error("invalid_cache_name", name=name)


def _agents_for(hass: HomeAssistant, entity_ids: list[str] | None) -> list[Agent]:
    runtimes = _runtimes(hass)
    if entity_ids is None:
        agents = [agent for runtime in runtimes for agent in runtime.chat_agents]
        if not agents:
            raise _validation_error("no_agents")
        return agents
    registry = er.async_get(hass)
    found: list[Agent] = []
    for entity_id in entity_ids:
        entity = registry.async_get(entity_id)
        agent = next(
            (
                runtime.agents[entity.config_subentry_id]
                for runtime in runtimes
                if entity is not None
                and entity.platform == DOMAIN
                and entity.config_subentry_id in runtime.agents
                and runtime.agents[entity.config_subentry_id].chat
            ),
            None,
        )
        if agent is None:
            raise _validation_error("unknown_agent", agent=entity_id)
        found.append(agent)
    return found


def _agent_for_model(hass: HomeAssistant, model: str) -> Agent:
    for runtime in _runtimes(hass):
        for agent in runtime.agents.values():
            if agent.loaded.name == model:
                return agent
    raise _validation_error("model_not_loaded", model=model)


def _entry_json(entry: CacheEntry) -> dict[str, Any]:
    metadata = entry.metadata
    return {
        "model": entry.model,
        "name": entry.name,
        **(metadata.to_json() if metadata is not None else {}),
        "problem": entry.problem,
    }


async def _async_build(
    agent: Agent, name: str, prefix: SystemPrefix | None, source: str
) -> CacheEntry:
    try:
        if prefix is None:
            return await agent.async_rebuild(name, source)
        async with agent.loaded.lock:
            return await agent.engine.async_build_cache(
                agent.loaded, prefix, name, source
            )
    except (RKLLMError, CacheError) as err:
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="cache_build_failed",
            translation_placeholders={"model": agent.loaded.name, "error": str(err)},
        ) from err


async def _async_rebuild_cache(call: ServiceCall) -> ServiceResponse:
    name: str = call.data[CONF_NAME]
    _check_name(name)
    caches = []
    registry = er.async_get(call.hass)
    for agent in _agents_for(call.hass, call.data.get(ATTR_AGENT)):
        entry = await _async_build(agent, name, None, SERVICE_REBUILD_CACHE)
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
    return cast("ServiceResponse", {"caches": caches}) if call.return_response else None


async def _async_list_caches(call: ServiceCall) -> ServiceResponse:
    model: str | None = call.data.get(CONF_MODEL)
    results: list[dict[str, Any]] = []
    for runtime in _runtimes(call.hass):
        engine = runtime.engine
        try:
            entries: list[CacheEntry] = await call.hass.async_add_executor_job(
                engine.store.list, model
            )
        except CacheError as err:
            raise _validation_error(err.translation_key, **err.placeholders) from err
        for entry in entries:
            loaded = engine.models.get(entry.model)
            agent = next((a for a in runtime.chat_agents if a.loaded is loaded), None)
            valid = (
                entry.problem is None
                and agent is not None
                and agent.prefix is not None
                and entry.invalid_reason(engine.expectation(agent.loaded, agent.prefix))
                is None
            )
            results.append({**_entry_json(entry), "valid": valid})
        results.extend(
            {
                "model": name,
                "name": SYSTEM_CACHE_NAME,
                "problem": "not_saved_by_runtime",
                "error": loaded.cache_unsupported,
                "valid": False,
            }
            for name, loaded in engine.models.items()
            if loaded.cache_unsupported is not None and model in (None, name)
        )
    return cast("ServiceResponse", {"caches": results})


async def _async_create_cache(call: ServiceCall) -> ServiceResponse:
    name: str = call.data[CONF_NAME]
    _check_name(name)
    agent = _agent_for_model(call.hass, call.data[CONF_MODEL])
    tools = agent.prefix.tools_json if agent.prefix is not None else "[]"
    prefix = SystemPrefix(prompt=call.data[CONF_PROMPT], tools_json=tools)
    entry = await _async_build(agent, name, prefix, SERVICE_CREATE_CACHE)
    return {"cache": _entry_json(entry)} if call.return_response else None


async def _async_delete_cache(call: ServiceCall) -> None:
    name: str = call.data[CONF_NAME]
    model: str = call.data[CONF_MODEL]
    _check_name(name)
    agent = _agent_for_model(call.hass, model)
    engine, loaded = agent.engine, agent.loaded
    async with loaded.lock:
        try:
            deleted = await engine.async_delete_cache(loaded, name)
        except CacheError as err:
            raise _validation_error(err.translation_key, **err.placeholders) from err
    if not deleted:
        raise _validation_error("cache_not_found", model=model, name=name)
    if name == SYSTEM_CACHE_NAME:
        for runtime in _runtimes(call.hass):
            for other in runtime.agents.values():
                if other.loaded is loaded:
                    other.cache = None
                    other.prefix = None


async def _async_benchmark(call: ServiceCall) -> ServiceResponse:
    [agent] = _agents_for(call.hass, [call.data[ATTR_AGENT]])
    loaded = agent.loaded
    async with loaded.lock:  # waits behind voice requests, never interrupts them
        if agent.prefix is None or agent.cache is None:
            raise _validation_error("cache_not_ready", agent=call.data[ATTR_AGENT])
        try:
            result = await async_benchmark(
                agent.engine,
                loaded,
                agent.prefix,
                agent.cache,
                question=call.data[ATTR_QUESTION],
                runs=call.data[ATTR_RUNS],
                max_new_tokens=agent.settings.max_new_tokens,
            )
        except RKLLMError as err:
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key="generation_failed",
                translation_placeholders={"error": str(err)},
            ) from err
    return cast("ServiceResponse", result)


@callback
def async_setup_services(hass: HomeAssistant) -> None:
    """Register the integration's actions."""
    hass.services.async_register(
        DOMAIN,
        SERVICE_REBUILD_CACHE,
        _async_rebuild_cache,
        schema=REBUILD_SCHEMA,
        supports_response=SupportsResponse.OPTIONAL,
    )
    hass.services.async_register(
        DOMAIN,
        SERVICE_LIST_CACHES,
        _async_list_caches,
        schema=LIST_SCHEMA,
        supports_response=SupportsResponse.ONLY,
    )
    hass.services.async_register(
        DOMAIN,
        SERVICE_CREATE_CACHE,
        _async_create_cache,
        schema=CREATE_SCHEMA,
        supports_response=SupportsResponse.OPTIONAL,
    )
    hass.services.async_register(
        DOMAIN, SERVICE_DELETE_CACHE, _async_delete_cache, schema=DELETE_SCHEMA
    )
    hass.services.async_register(
        DOMAIN,
        SERVICE_BENCHMARK,
        _async_benchmark,
        schema=BENCHMARK_SCHEMA,
        supports_response=SupportsResponse.ONLY,
    )
