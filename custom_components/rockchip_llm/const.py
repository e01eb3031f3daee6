"""Constants of the Rockchip LLM integration."""

from collections.abc import Mapping
from enum import StrEnum
import logging
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

DOMAIN: Final = "rockchip_llm"
LOGGER = logging.getLogger(__package__)

# Config entry (one runtime)
CONF_LIBRARY_PATH: Final = "library_path"
CONF_MODELS_DIR: Final = "models_dir"
CONF_CACHE_DIR: Final = "cache_dir"
CONF_CACHE_BUDGET: Final = "cache_budget_mb"
DEFAULT_CACHE_BUDGET_MB: Final = 2048
"""Room for a few system and automatic caches of a small model on an SD card."""
CONF_STALL_TIMEOUT: Final = "stall_timeout_s"
DEFAULT_STALL_TIMEOUT_S: Final = 30
"""Seconds a run may go without new text before the watchdog stops it."""
CONF_HOST_ADDRESS: Final = "host_address"
"""Where a runtime host that Home Assistant does not start listens (a socket path or
host:port); without it, Home Assistant starts the host on this machine."""
CONF_PAIRING_KEY: Final = "pairing_key"
"""The pairing key a TCP host printed (its state folder keeps it too)."""
CONF_HOST_IDENTITY: Final = "host_identity"
"""The identity of the TCP host paired with: sha256:<hex> of its certificate, also
the entry's unique id."""
CONF_ABI_FAMILY: Final = "abi_family"
"""ABI family to use when the library cannot be identified ("auto": none given)."""
ABI_FAMILY_AUTO: Final = "auto"

LIBRARY_CANDIDATES: Final = (
    Path("/usr/lib/librkllmrt.so"),
    Path("/usr/local/lib/librkllmrt.so"),
)
CONFIG_SUBDIR: Final = "rkllm"
"""<config>/rkllm holds the default library location, models and caches."""

# Subentries (agents)
SUBENTRY_CONVERSATION: Final = "conversation"
SUBENTRY_AI_TASK: Final = "ai_task_data"

CONF_MODEL: Final = "model"
CONF_PROMPT: Final = "prompt"
CONF_MAX_CONTEXT_LEN: Final = "max_context_len"
MAX_CONTEXT_FIELD: Final = 32768
"""The largest context the forms offer (the model's own limit, where known, is lower)."""
CONF_MAX_NEW_TOKENS: Final = "max_new_tokens"
CONF_TEMPERATURE: Final = "temperature"
CONF_TOP_K: Final = "top_k"
CONF_TOP_P: Final = "top_p"
CONF_REPEAT_PENALTY: Final = "repeat_penalty"
CONF_ENABLE_THINKING: Final = "enable_thinking"
CONF_MAX_HISTORY: Final = "max_history"
CONF_HISTORY_STRATEGY: Final = "history_strategy"
CONF_TOOL_GROUPS: Final = "tool_groups"
"""The tool groups an agent offers (tool_groups.py); absent: every group."""
CONTEXT_FOLLOWS_MODEL: Final = 0
"""A max_context_len of 0: the model's own limit, up to MAX_SAFE_CONTEXT_LEN."""
MAX_SAFE_CONTEXT_LEN: Final = 8192
"""The largest context an agent follows a model up to (a larger one is set by hand).

The runtime sizes its KV cache for the whole context when it loads the model: for
Qwen3-4B (36 layers x 8 KV heads x 128 dims x K and V x fp16) that is 144 KB per
token, 1.2 GB at 8,192 tokens beside its 4.5 GB of weights, which an 8 GB board
holds; 16,384 would need 2.4 GB. Prefill and decoding also slow with the context."""
MIN_TURN_TOKENS: Final = 64
"""Room a prefix must leave for a short turn (a voice command, its template and the
time line) beside the smallest answer (run_planner.MIN_REPLY_TOKENS), or the agent
leaves parts of it out."""


class HistoryStrategy(StrEnum):
    """How follow-up turns reuse the model's KV cache."""

    AUTO = "auto"
    """Keep history in the KV and send only new turns; reset to the system cache otherwise."""
    PROMPT_CACHE_ONLY = "prompt_cache_only"
    """Every run is independent; only the system prompt cache is reused."""
    OFF = "off"
    """No reuse at all: every run prefills the whole prompt."""


AGENT_OPTION_DEFAULTS: Final[Mapping[str, Any]] = MappingProxyType(
    {
        CONF_MAX_CONTEXT_LEN: CONTEXT_FOLLOWS_MODEL,
        CONF_MAX_NEW_TOKENS: 256,
        CONF_TEMPERATURE: 0.7,
        CONF_TOP_K: 20,
        CONF_TOP_P: 0.8,
        CONF_REPEAT_PENALTY: 1.1,
        CONF_ENABLE_THINKING: False,
        CONF_MAX_HISTORY: 10,
        CONF_HISTORY_STRATEGY: HistoryStrategy.AUTO.value,
    }
)
"""The one table of agent option defaults: a new agent's options, and what an agent
stored before an option existed reads."""

AI_TASK_MAX_NEW_TOKENS: Final = 1024
"""A new AI Task agent's answer budget: summaries and JSON run longer than voice answers."""

DEFAULT_PROMPT_FILE: Final = Path(__file__).parent / "prompts" / "system.txt"

SYSTEM_CACHE_NAME: Final = "system"
AUTO_CACHE_PREFIX: Final = "auto_"
"""Caches built for prefixes requests carry (e.g. a satellite's area line)."""
MAX_AUTO_CACHES: Final = 4
REBUILD_DEBOUNCE_SECONDS: Final = 30.0
MAX_TOOL_ITERATIONS: Final = 10
