"""Diagnostics: runtime, NPU, models, every agent's state, last runs and prompt caches.

Everything here is safe to post publicly: prompts are redacted (they can name
people), conversation history is never included, only counts and hashes.
"""

from collections import deque
import contextlib
import dataclasses
from enum import Enum
import json
from pathlib import Path
from typing import Any, Final

from homeassistant.components.diagnostics import async_redact_data
from homeassistant.config_entries import ConfigEntryState, ConfigSubentry
from homeassistant.core import HomeAssistant

from . import AGENT_SUBENTRIES, RockchipConfigEntry, RockchipRuntime
from .agent import Agent
from .connect import async_open_host
from .const import CONF_MODEL, CONF_PAIRING_KEY, CONF_PROMPT, SUBENTRY_CONVERSATION
from .engine import Engine
from .host.model_files import ModelScan, ModelsDirError
from .host.prompt_cache import CacheEntry, CacheError
from .host.rkllm.errors import RKLLMError
from .host.rkllm.library import RuntimeInfo
from .prefix_report import prefix_attributes
from .remote import RuntimeHost
from .session import ModelSession

TO_REDACT: Final = {CONF_PROMPT}
ENTRY_TO_REDACT: Final = {CONF_PAIRING_KEY}
"""A TCP host's pairing key: whoever has it can use the host."""


def _jsonable(value: Any) -> Any:
    """Turn dataclasses, paths, enums and sequences into JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: _jsonable(getattr(value, field.name))
            for field in dataclasses.fields(value)
        }
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple | deque):
        return [_jsonable(item) for item in value]
    return value


def _runtime_info(info: RuntimeInfo) -> dict[str, Any]:
    """Describe the library file and how its version was established."""
    return {
        "path": str(info.path),
        "family": str(info.family),
        "version": info.version,
        "version_source": str(info.version_source),
        "size": info.size,
        "mtime_ns": info.mtime_ns,
        "blob_sha1": info.blob_sha1,
    }


def _scan(scan: ModelScan) -> dict[str, Any]:
    """List the models found in the models folder."""
    return {
        "models": {
            name: {
                "path": str(info.path),
                "size_bytes": info.size_bytes,
                "ignored_files": list(info.ignored_files),
            }
            for name, info in scan.models.items()
        },
        "loose_files": list(scan.loose_files),
        "unreadable": list(scan.unreadable),
    }


def _session(session: ModelSession) -> dict[str, Any]:
    """Describe a loaded model: identity, init parameters and what its handle holds."""
    worker = session.worker
    loaded_cache = session.loaded_cache
    return {
        "path": str(session.info.path),
        "fingerprint": dict(session.fingerprint),
        "params": _jsonable(session.params),
        "users": session.users,
        "loaded_cache": loaded_cache.name if loaded_cache else None,
        "prompt_cache_unsupported": session.cache_unsupported,
        "kv_tokens": session.kv_tokens,
        "kv_messages": session.kv_messages,
        "busy": session.busy,
        "worker": {
            "pid": worker.pid,
            "died": str(worker.death) if worker.death else None,
            "deaths_recent": len(session.deaths),
            "given_up": str(session.failure) if session.failure else None,
            "runtime_output": worker.output_tail(),
        },
        # Runs are recorded per model, not per agent.
        "recent_runs": _jsonable(session.recent),
    }


def _prefix(agent: Agent) -> dict[str, Any] | None:
    """Summarise the agent's rendered system prefix: hashes and sizes, no text."""
    prefix = agent.system_cache.prefix if agent.system_cache else None
    if prefix is None:
        return None
    expectation = agent.session.expectation(prefix)
    return {
        "prompt_sha256": expectation.prompt_sha256,
        "prompt_length": len(prefix.prompt),
        "tools": len(json.loads(prefix.tools_json)),
        "tools_sha256": prefix.tools_sha256,
        # Tokens against the context, split; what was left out to fit.
        "tokens": prefix_attributes(agent),
    }


def _agent_state(
    entry: RockchipConfigEntry, subentry: ConfigSubentry
) -> dict[str, Any]:
    """Describe an agent, set up or not: its state and reason, then its details."""
    runtime = entry.runtime_data
    failure = runtime.failure(subentry.subentry_id)
    described: dict[str, Any] = {
        "title": subentry.title,
        "chat": subentry.subentry_type == SUBENTRY_CONVERSATION,
        "model": subentry.data[CONF_MODEL],
    }
    described |= failure.as_dict() if failure is not None else {"state": "loaded"}
    if (agent := runtime.agents.get(subentry.subentry_id)) is not None:
        described |= _agent(entry, agent)
    return described


def _agent(entry: RockchipConfigEntry, agent: Agent) -> dict[str, Any]:
    """Describe a set-up agent: settings, system prefix and cache, model it shares."""
    runtime = entry.runtime_data
    cache = agent.system_cache.cache if agent.system_cache else None
    return {
        "settings": _jsonable(agent.settings),
        "history_strategy_in_force": agent.history.strategy.value,
        "reuse_failures": list(agent.history.failures),
        "cache": cache.name if cache else None,
        "prefix": _prefix(agent),
        "recent_runs": [
            _jsonable(run)
            for run in agent.session.recent
            if run.agent == agent.subentry_id
        ],
        "shares_model_with": [
            other.subentry_id
            for other in runtime.agents.values()
            if other is not agent and other.session is agent.session
        ],
    }


def _cache(runtime: RockchipRuntime, entry: CacheEntry) -> dict[str, Any]:
    """Describe a stored cache and whether it serves its agents' current prefix."""
    checks = runtime.cache_checks(entry)
    return {
        "model": entry.model,
        "name": entry.name,
        "bin_path": str(entry.bin_path),
        "problem": entry.problem,
        "metadata": entry.metadata.to_json() if entry.metadata else None,
        "valid": any(reason is None for reason in checks.values()) if checks else None,
        "agents": {
            subentry_id: reason or "valid" for subentry_id, reason in checks.items()
        },
    }


async def _async_caches(
    runtime: RockchipRuntime,
) -> list[dict[str, Any]] | dict[str, str]:
    """List every stored cache of the runtime's cache folder."""
    engine: Engine = runtime.engine
    try:
        entries = await engine.store.async_list()
    except (RKLLMError, CacheError) as err:
        return {"error": str(err)}
    return [_cache(runtime, entry) for entry in entries]


def _host(host: RuntimeHost) -> dict[str, Any]:
    """Describe the runtime host: where it runs, its version and the board."""
    return {
        "where": host.where,
        "version": host.hello.get("host_version"),
        "pid": host.link.pid,
        "identity": host.identity,
        "models_dir": host.hello.get("models_dir"),
        "cache_dir": host.hello.get("cache_dir"),
        "board": host.board,
    }


def _library(host: RuntimeHost) -> dict[str, Any]:
    """Describe the host's runtime library, or why it cannot use it."""
    if (info := host.runtime) is None:
        return {
            "path": host.hello.get("library_path"),
            "error": str(host.library_error()),
        }
    return _runtime_info(info) | {"simulated": host.simulated}


async def _async_inspect_unloaded(
    hass: HomeAssistant, entry: RockchipConfigEntry
) -> dict[str, Any]:
    """Ask the host of an entry that is not loaded what it has."""
    try:
        host = await async_open_host(hass, entry.data, entry.entry_id)
    except RKLLMError as err:
        return {"host": {"error": str(err)}}
    try:
        result: dict[str, Any] = {"host": _host(host), "runtime": _library(host)}
        try:
            result["models"] = _scan(await host.async_scan())
        except ModelsDirError as err:
            result["models"] = {"error": err.reason}
    finally:
        await host.async_close()
    return result


async def async_get_config_entry_diagnostics(
    hass: HomeAssistant, entry: RockchipConfigEntry
) -> dict[str, Any]:
    """Return diagnostics for a config entry."""
    data: dict[str, Any] = {
        "entry": {
            "title": entry.title,
            "state": entry.state.value,
            "reason": entry.reason,
            "data": async_redact_data(entry.data, ENTRY_TO_REDACT),
            "options": dict(entry.options),
        },
        "subentries": {
            subentry_id: {
                "subentry_type": subentry.subentry_type,
                "title": subentry.title,
                "data": async_redact_data(subentry.data, TO_REDACT),
            }
            for subentry_id, subentry in entry.subentries.items()
        },
    }
    if entry.state is not ConfigEntryState.LOADED:
        return data | await _async_inspect_unloaded(hass, entry)
    runtime = entry.runtime_data
    engine = runtime.engine
    for session in engine.sessions.values():
        with contextlib.suppress(RKLLMError):
            await session.worker.async_refresh_tail()
    data |= {
        "host": _host(engine.host) | {"board": await engine.host.async_board_info()},
        "runtime": _library(engine.host),
        "models": _scan(runtime.scan),
        "loaded_models": {
            name: _session(session) for name, session in engine.sessions.items()
        },
        # Every agent, also one that was not set up (its state says why).
        "agents": {
            subentry_id: _agent_state(entry, subentry)
            for subentry_id, subentry in entry.subentries.items()
            if subentry.subentry_type in AGENT_SUBENTRIES
        },
        "caches": await _async_caches(runtime),
    }
    return data
