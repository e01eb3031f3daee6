"""One turn of a conversation on a held model (no Home Assistant imports).

The caller hands over the conversation as :class:`~.run_planner.Message` records;
the turn plans each run (what the KV already holds, what fits the context), runs
it, checks the prefix was reused, records its measurements and, at the end, what
the KV holds for the next turn.
"""

from collections.abc import AsyncGenerator, Callable
import contextlib
from dataclasses import dataclass, replace
import logging

from .const import HistoryStrategy
from .generation import Generation, perf_or_zero
from .held_model import HeldModel, ReuseGuard, is_exact
from .host.prompt_cache import CacheEntry
from .host.rkllm.runtime import RunRequest, Sampling
from .run_planner import (
    ContextBudget,
    KVState,
    Message,
    RunPlan,
    SystemPrefix,
    estimate_tokens,
    expected_prefill,
    plan_run,
)

_LOGGER = logging.getLogger(__name__)

type MessageSource = Callable[[], list[Message]]
"""Returns the conversation after the system prompt, as the model sees it."""


@dataclass(frozen=True, slots=True)
class RunStats:
    """Measurements of one generation, for sensors, diagnostics and benchmarks."""

    agent: str
    """The subentry id of the agent that asked."""
    prefill_tokens: int
    prefill_ms: float
    generate_tokens: int
    generate_ms: float
    ttft_ms: float | None
    reused_history: bool
    cache: str | None


@dataclass(frozen=True, slots=True)
class ReplyOptions:
    """What an agent asks of the runs of a turn."""

    agent: str
    """The subentry id of the agent (runs are recorded under it)."""
    max_context_len: int
    max_new_tokens: int
    max_history: int
    sampling: Sampling
    enable_thinking: bool
    fallback_cache: CacheEntry | None = None
    """Loaded when no cache holds the turn's prefix: it shares leading tokens."""


class Conversation:
    """One turn of a conversation on a held model: ``reply`` once per run."""

    def __init__(
        self,
        held: HeldModel,
        prefix: SystemPrefix,
        options: ReplyOptions,
        guard: ReuseGuard,
        *,
        prefix_cached: bool,
    ) -> None:
        """Bind the turn to the held model, whose prefix and cache are set."""
        self._held = held
        self._prefix = prefix
        self._options = options
        self._guard = guard
        self.prefix_cached = prefix_cached
        """Whether a stored cache holds all of the turn's prefix."""
        self._kept: tuple[MessageSource, Generation] | None = None

    def reply(
        self,
        messages: MessageSource,
        *,
        instructions: str | None = None,
        volatile: str = "",
    ) -> AsyncGenerator[str]:
        """Run the model on the conversation's pending input; iterate for its text.

        messages is read when iteration starts (to plan the run) and again before
        the next run or at the end of the turn (to record what the KV then holds).
        instructions are appended to the input; volatile (HA's current-time line,
        kept out of the cached prefix) goes in front of a user turn. Leaving the
        iteration early aborts the run.
        """
        self.finish()
        return self._async_reply(messages, instructions, volatile)

    def finish(self) -> None:
        """Record what the KV holds after the last run that kept history.

        Only a run that finished (FINISH with perf, no abort, under its token limit)
        leaves a KV we know; otherwise it is unknown and reset before the next turn.
        Without the runtime's count the KV cannot be budgeted either.
        """
        if self._kept is None:
            return
        (source, generation), self._kept = self._kept, None
        held, result = self._held, generation.result
        size = result.kv_cache_size if result else None
        finished = (
            result is not None
            and result.perf is not None
            and not result.aborted
            and not result.stopped_at_limit
        )
        if not finished or size is None:
            held.kv, held.kv_tokens = None, 0
            return
        held.kv = KVState(self._prefix.key, _answered(self._messages(source)))
        held.kv_tokens = size

    def _messages(self, source: MessageSource) -> list[Message]:
        """Read the conversation; a tool result is sent as it was first sent.

        Home Assistant fills the intent response inside a result after the turn
        (the final speech), so a later serialisation would not match the KV.
        """
        sent = self._held.sent_tool_results
        return [
            replace(message, text=sent.setdefault(message.tool_call_id, message.text))
            if message.tool_call_id is not None
            else message
            for message in source()
        ]

    def _plan(
        self, messages: list[Message], extra: str, strategy: HistoryStrategy
    ) -> tuple[RunPlan, int, bool]:
        """Plan a run: the plan, the prefix's tokens, and whether they are exact."""
        held, options = self._held, self._options
        cache = held.loaded_cache
        # Exact for a cache of this very prefix; otherwise a conservative estimate.
        exact_cache = (
            strategy is not HistoryStrategy.OFF
            and cache is not None
            and cache.metadata is not None
            and is_exact(cache, self._prefix)
        )
        prefix_tokens = (
            cache.metadata.tokens
            if exact_cache and cache and cache.metadata
            else estimate_tokens(self._prefix.prompt + self._prefix.tools_json)
        )
        plan = plan_run(
            held.kv,
            self._prefix,
            messages,
            keep_history=strategy is HistoryStrategy.AUTO,
            max_history=options.max_history,
            budget=ContextBudget(
                max_context_len=options.max_context_len,
                prefix_tokens=prefix_tokens,
                kv_tokens=max(held.kv_tokens, prefix_tokens),
                reply_tokens=options.max_new_tokens,
                extra_tokens=estimate_tokens(extra),
            ),
        )
        if plan.max_new_tokens < options.max_new_tokens:
            _LOGGER.debug(
                "%s: answer budget shrunk to %d tokens to fit the context",
                held.session.name,
                plan.max_new_tokens,
            )
        if plan.dropped_messages:
            _LOGGER.debug(
                "%s: %d earlier messages left out to fit the context",
                held.session.name,
                plan.dropped_messages,
            )
        return plan, prefix_tokens, exact_cache

    async def _async_reply(
        self, source: MessageSource, instructions: str | None, volatile: str
    ) -> AsyncGenerator[str]:
        held, options = self._held, self._options
        # A check of the previous run may have switched the strategy.
        strategy = self._guard.strategy
        keep_history = strategy is HistoryStrategy.AUTO
        extra = (
            f"{volatile}\n\n{instructions or ''}\n\n"
            if volatile or instructions
            else ""
        )
        plan, prefix_tokens, exact_cache = self._plan(
            self._messages(source), extra, strategy
        )
        prompt = plan.text(volatile=volatile, instructions=instructions)
        generation = held.generation(
            RunRequest(
                prompt=prompt,
                role=plan.role,
                enable_thinking=options.enable_thinking,
                keep_history=keep_history,
                sampling=options.sampling,
                max_new_tokens=plan.max_new_tokens,
                # "off" measures the no-reuse baseline: not even the system prompt stays.
                clear_kv_first=None
                if plan.reuse_history
                else "all"
                if strategy is HistoryStrategy.OFF
                else "to_system",
            )
        )
        if not plan.reuse_history:
            held.kv_cleared()
        held.kv = None  # unknown until the run completes
        if keep_history:
            self._kept = (source, generation)
        cache = held.loaded_cache
        # Closing the reply early aborts the run at once, not when it is collected.
        async with contextlib.aclosing(aiter(generation)) as texts:
            async for text in texts:
                yield text
        result = generation.result
        perf = perf_or_zero(result.perf if result else None)
        if (
            result is not None
            and result.perf is not None
            and not result.aborted
            and (plan.reuse_history or exact_cache)
        ):
            self._guard.check_reuse(
                perf.prefill_tokens, expected_prefill(prompt), prefix_tokens, "request"
            )
        _LOGGER.debug(
            "%s: prefilled %d tokens in %.1f ms (history reused: %s, cache: %s), "
            "generated %d tokens in %.1f ms",
            held.session.name,
            perf.prefill_tokens,
            perf.prefill_time_ms,
            plan.reuse_history,
            cache and cache.name,
            perf.generate_tokens,
            perf.generate_time_ms,
        )
        held.session.record(
            RunStats(
                agent=options.agent,
                prefill_tokens=perf.prefill_tokens,
                prefill_ms=perf.prefill_time_ms,
                generate_tokens=perf.generate_tokens,
                generate_ms=perf.generate_time_ms,
                ttft_ms=generation.ttft_ms,
                reused_history=plan.reuse_history,
                cache=cache.name if cache else None,
            )
        )


def _answered(messages: list[Message]) -> tuple[Message, ...]:
    """Messages up to the last assistant answer (what the KV holds after a run)."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == "assistant":
            return tuple(messages[: index + 1])
    return ()
