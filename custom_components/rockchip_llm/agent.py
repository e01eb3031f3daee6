"""One agent (a conversation or AI Task subentry) and the model session it talks to."""

from collections.abc import AsyncIterator, Mapping
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Self

from homeassistant.core import HomeAssistant
from homeassistant.util import dt as dt_util

from .agent_prefix import date_time_line, remember
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
from .early_turn import EarlyTurn
from .history_strategy import HistoryStrategyGuard
from .host.rkllm.runtime import Sampling
from .run_planner import MIN_REPLY_TOKENS, SystemPrefix
from .session import ModelSession
from .system_cache import SystemCacheKeeper
from .turn import Conversation, MessageSource, ReplyOptions

_EXPECTED = 16
"""Devices whose next request's prefix an agent expects (the most recent ones)."""


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
        self._expected: dict[str | None, tuple[SystemPrefix, bool]] = {}
        """By device, the prefix its last request carried and whether it was timed."""

    @property
    def chat(self) -> bool:
        """Whether this is a conversation agent."""
        return self.system_cache is not None

    def start_turn_early(
        self, device_id: str | None, messages: MessageSource
    ) -> EarlyTurn | None:
        """Start a turn with the prefix device_id's last request carried, if any.

        Called before Home Assistant renders the request's prompt (early_turn.py).
        Only a model that is idle with that prefix starts: a guess never costs it
        work (another prefix, a cache to load) the turn would not do.
        """
        expected = self._expected.get(device_id)
        if expected is None:
            return None
        prefix, timed = expected
        if not self.session.holds(prefix, thinking=self.settings.enable_thinking):
            return None
        return EarlyTurn(
            self.session.async_conversation(
                prefix, self._reply_options(), self.history
            ),
            prefix.key,
            messages,
            date_time_line(dt_util.now()) if timed else "",
        )

    @contextlib.asynccontextmanager
    async def async_turn(
        self,
        prefix: SystemPrefix,
        *,
        volatile: str = "",
        device_id: str | None = None,
        early: EarlyTurn | None = None,
    ) -> AsyncIterator[tuple[Conversation, AsyncIterator[str] | None]]:
        """Hold the model for a turn with prefix: the conversation and a started reply.

        The early turn is taken over when it has prefix (its reply is the turn's
        first), else ended. A conversation agent expects the next request of
        device_id to carry prefix and volatile's kind again.
        """
        if self.chat:
            remember(self._expected, device_id, (prefix, bool(volatile)), _EXPECTED)
        taken = await early.async_take(prefix.key) if early is not None else None
        if taken is None:
            async with self.async_conversation(prefix) as conversation:
                yield conversation, None
            return
        assert early is not None
        conversation, reply = taken
        self._seen(prefix, conversation)
        try:
            yield conversation, reply
        except BaseException as err:
            await early.async_end(err)
            raise
        await early.async_end()

    def _reply_options(self) -> ReplyOptions:
        settings = self.settings
        return ReplyOptions(
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

    @contextlib.asynccontextmanager
    async def async_conversation(
        self, prefix: SystemPrefix
    ) -> AsyncIterator[Conversation]:
        """Hold the model for one turn with prefix; a prefix without a cache gets one."""
        async with self.session.async_conversation(
            prefix, self._reply_options(), self.history
        ) as conversation:
            self._seen(prefix, conversation)
            yield conversation

    def _seen(self, prefix: SystemPrefix, conversation: Conversation) -> None:
        if self.system_cache is not None:
            self.system_cache.prefix_seen(prefix, cached=conversation.prefix_cached)

    def shutdown(self) -> None:
        """Cancel a pending cache rebuild."""
        if self.system_cache is not None:
            self.system_cache.shutdown()
