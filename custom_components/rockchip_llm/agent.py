"""One agent (a conversation or AI Task subentry) and the model session it talks to."""

from collections.abc import AsyncIterator, Mapping
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Self

from homeassistant.core import HomeAssistant

from .const import (
    AGENT_OPTION_DEFAULTS,
    CONF_ENABLE_THINKING,
    CONF_HISTORY_STRATEGY,
    CONF_MAX_CONTEXT_LEN,
    CONF_MAX_HISTORY,
    CONF_MAX_NEW_TOKENS,
    CONF_MODEL,
    CONF_REPEAT_PENALTY,
    CONF_TEMPERATURE,
    CONF_TOP_K,
    CONF_TOP_P,
    CONTEXT_FOLLOWS_MODEL,
    MAX_SAFE_CONTEXT_LEN,
    MIN_TURN_TOKENS,
    SYSTEM_CACHE_NAME,
    HistoryStrategy,
)
from .history_strategy import HistoryStrategyGuard
from .host.rkllm.runtime import Sampling
from .run_planner import MIN_REPLY_TOKENS, SystemPrefix
from .session import ModelSession
from .system_cache import SystemCacheKeeper
from .turn import Conversation, ReplyOptions


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """The options of an agent, with defaults filled in."""

    model: str
    max_context_len: int
    max_new_tokens: int
    sampling: Sampling
    enable_thinking: bool
    max_history: int
    history_strategy: HistoryStrategy

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Self:
        """Read settings from subentry data, defaults filled in."""
        values = {**AGENT_OPTION_DEFAULTS, **options}
        return cls(
            model=values[CONF_MODEL],
            max_context_len=int(values[CONF_MAX_CONTEXT_LEN]),
            max_new_tokens=int(values[CONF_MAX_NEW_TOKENS]),
            sampling=Sampling(
                top_k=int(values[CONF_TOP_K]),
                top_p=float(values[CONF_TOP_P]),
                temperature=float(values[CONF_TEMPERATURE]),
                repeat_penalty=float(values[CONF_REPEAT_PENALTY]),
            ),
            enable_thinking=bool(values[CONF_ENABLE_THINKING]),
            max_history=int(values[CONF_MAX_HISTORY]),
            history_strategy=HistoryStrategy(values[CONF_HISTORY_STRATEGY]),
        )


class Agent:
    """An agent: its settings, its model's session, its history strategy in force.

    A conversation agent also keeps a system prompt cache; an AI Task agent runs
    every task on its own (prompt caches only, no history kept in the KV).
    """

    def __init__(
        self,
        hass: HomeAssistant,
        session: ModelSession,
        subentry_id: str,
        options: Mapping[str, Any],
        *,
        chat: bool,
        title: str = "",
        system_cache_name: str = SYSTEM_CACHE_NAME,
    ) -> None:
        """Bind an agent to the session of its model."""
        self.subentry_id = subentry_id
        self.title = title or subentry_id
        settings = AgentSettings.from_options(options)
        if settings.max_context_len == CONTEXT_FOLLOWS_MODEL:
            settings = dataclasses.replace(
                settings,
                max_context_len=min(
                    session.params.max_context_len, MAX_SAFE_CONTEXT_LEN
                ),
            )
        self.settings = settings
        """Settings in force (a context that follows the model: the one loaded)."""
        self.session = session
        self.history = HistoryStrategyGuard(
            hass,
            subentry_id,
            self.title,
            self.settings.history_strategy
            if chat
            else HistoryStrategy.PROMPT_CACHE_ONLY,
        )
        self.system_cache = (
            SystemCacheKeeper(
                hass,
                session,
                options,
                self.history,
                system_cache_name,
                room=MIN_TURN_TOKENS + MIN_REPLY_TOKENS,
                max_context_len=settings.max_context_len,
            )
            if chat
            else None
        )
        """The system prompt cache a conversation agent keeps (None: AI Task)."""

    @property
    def chat(self) -> bool:
        """Whether this is a conversation agent."""
        return self.system_cache is not None

    @contextlib.asynccontextmanager
    async def async_conversation(
        self, prefix: SystemPrefix
    ) -> AsyncIterator[Conversation]:
        """Hold the model for one turn with prefix; a prefix without a cache gets one."""
        settings = self.settings
        options = ReplyOptions(
            agent=self.subentry_id,
            max_context_len=settings.max_context_len,
            max_new_tokens=settings.max_new_tokens,
            max_history=settings.max_history,
            sampling=settings.sampling,
            enable_thinking=settings.enable_thinking,
            # Without a cache for this exact prompt, the system cache still saves
            # its identical leading tokens.
            fallback_cache=self.system_cache.cache if self.system_cache else None,
        )
        async with self.session.async_conversation(
            prefix, options, self.history
        ) as conversation:
            if self.system_cache is not None:
                self.system_cache.prefix_seen(prefix, cached=conversation.prefix_cached)
            yield conversation

    def shutdown(self) -> None:
        """Cancel a pending cache rebuild."""
        if self.system_cache is not None:
            self.system_cache.shutdown()
